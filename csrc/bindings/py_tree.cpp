#include "bindings/py_tree.h"

#include <string>
#include <utility>
#include <vector>

#include "core/error.h"

namespace py = pybind11;

namespace pyckpt::bindings {
namespace {

namespace pk = pyckpt::pickle;

class TreeConverter {
 public:
  TreeConverter(const pk::Tree& tree, py::object interpreter, int max_nesting)
      : tree_(tree), interpreter_(std::move(interpreter)), max_nesting_(max_nesting),
        built_(tree.nodes.size()) {
    py::object collections = py::module_::import("collections");
    ordered_dict_ = collections.attr("OrderedDict");
    counter_ = collections.attr("Counter");
    int_from_bytes_ = py::module_::import("builtins").attr("int").attr("from_bytes");
    call_at_ = interpreter_.attr("call_at");
    persistent_at_ = interpreter_.attr("persistent_at");
    build_at_ = interpreter_.attr("build_at");
  }

  py::object convert_all() {
    for (pk::NodeId id = 0; id < tree_.nodes.size(); ++id) {
      const pk::Node& node = tree_.nodes[id];
      if (node.kind == pk::Kind::kCall || node.kind == pk::Kind::kPersistent ||
          node.kind == pk::Kind::kDict || node.kind == pk::Kind::kSet ||
          node.kind == pk::Kind::kFrozenSet || tree_.extras_of(id) != nullptr) {
        convert(id, 0);
      }
    }
    py::object unknown = interpreter_.attr("unknown_names");
    for (const auto& [name, count] : tree_.unknown_globals) {
      py::str key(name);
      unknown[key] = unknown.attr("get")(key, 0).cast<uint64_t>() + count;
    }
    return convert(tree_.root, 0);
  }

 private:
  py::object convert(pk::NodeId id, int depth) {
    if (built_[id]) return built_[id];
    if (depth > max_nesting_) {
      throw CheckpointError(ErrorKind::kCorrupt, "object tree nests deeper than " +
                                                     std::to_string(max_nesting_) + " levels");
    }
    const pk::Node& node = tree_.nodes[id];
    const std::vector<pk::NodeId>& items = tree_.items(node);
    py::object result;
    switch (node.kind) {
      case pk::Kind::kNone:
        result = py::none();
        break;
      case pk::Kind::kBool:
        result = py::bool_(node.flag);
        break;
      case pk::Kind::kInt:
        result = py::int_(node.integer);
        break;
      case pk::Kind::kBigInt:
        result = int_from_bytes_(py::bytes(tree_.text(node)), "little", py::arg("signed") = true);
        break;
      case pk::Kind::kFloat:
        result = py::float_(node.real);
        break;
      case pk::Kind::kString: {
        const std::string& text = tree_.text(node);
        PyObject* decoded = PyUnicode_DecodeUTF8(text.data(), static_cast<Py_ssize_t>(text.size()),
                                                 "surrogatepass");
        if (decoded == nullptr) throw py::error_already_set();
        result = py::reinterpret_steal<py::object>(decoded);
        break;
      }
      case pk::Kind::kBytes: {
        const std::string& text = tree_.text(node);
        result = py::bytes(text);
        if (node.flag) result = py::reinterpret_steal<py::object>(PyByteArray_FromObject(result.ptr()));
        if (!result) throw py::error_already_set();
        break;
      }
      case pk::Kind::kList: {
        py::list list;
        built_[id] = list;
        for (pk::NodeId item : items) list.append(convert(item, depth + 1));
        result = list;
        break;
      }
      case pk::Kind::kTuple: {
        py::tuple tuple(items.size());
        for (size_t i = 0; i < items.size(); ++i) tuple[i] = convert(items[i], depth + 1);
        result = tuple;
        break;
      }
      case pk::Kind::kSet:
      case pk::Kind::kFrozenSet: {
        py::set set;
        if (node.kind == pk::Kind::kSet) built_[id] = set;
        for (pk::NodeId item : items) add_hashable(set, convert(item, depth + 1));
        result = set;
        if (node.kind == pk::Kind::kFrozenSet) {
          result = py::reinterpret_steal<py::object>(PyFrozenSet_New(set.ptr()));
          if (!result) throw py::error_already_set();
        }
        break;
      }
      case pk::Kind::kDict:
        result = convert_dict(id, node, items, depth);
        break;
      case pk::Kind::kGlobal: {
        const std::string& text = tree_.text(node);
        const size_t split = text.find('\n');
        result = interpreter_.attr("resolve_global")(decode(text.substr(0, split)),
                                                     decode(text.substr(split + 1)));
        break;
      }
      case pk::Kind::kCall: {
        py::object func = convert(items[0], depth + 1);
        py::object args = convert(items[1], depth + 1);
        py::object kwargs = items.size() > 2 ? convert(items[2], depth + 1) : py::none();
        result = call_at_(func, args, node.flag, node.offset, kwargs);
        break;
      }
      case pk::Kind::kPersistent:
        result = persistent_at_(convert(items[0], depth + 1), node.offset);
        break;
    }
    built_[id] = result;
    if (const pk::Extras* extras = tree_.extras_of(id)) apply_extras(result, *extras, depth);
    return result;
  }

  void apply_extras(const py::object& target, const pk::Extras& extras, int depth) {
    if (!extras.appended.empty()) {
      py::list values;
      for (pk::NodeId item : extras.appended) values.append(convert(item, depth + 1));
      interpreter_.attr("extend_at")(target, values, extras.append_offset);
    }
    if (!extras.set_items.empty()) {
      py::list values;
      for (pk::NodeId item : extras.set_items) values.append(convert(item, depth + 1));
      interpreter_.attr("set_items_at")(target, values, extras.set_offset);
    }
    for (const pk::Build& build : extras.builds) {
      build_at_(target, convert(build.state, depth + 1), build.offset);
    }
  }

  static py::object decode(const std::string& text) {
    PyObject* decoded = PyUnicode_DecodeUTF8(text.data(), static_cast<Py_ssize_t>(text.size()), "strict");
    if (decoded == nullptr) throw py::error_already_set();
    return py::reinterpret_steal<py::object>(decoded);
  }

  static void add_hashable(py::set& set, const py::object& item) {
    if (PySet_Add(set.ptr(), item.ptr()) != 0) {
      if (!PyErr_ExceptionMatches(PyExc_TypeError)) throw py::error_already_set();
      PyErr_Clear();
      throw CheckpointError(ErrorKind::kCorrupt, std::string("bad pickle: set item of type ") +
                                                     Py_TYPE(item.ptr())->tp_name + " is not hashable");
    }
  }

  py::object convert_dict(pk::NodeId id, const pk::Node& node, const std::vector<pk::NodeId>& items,
                          int depth) {
    py::object mapping = node.dict_type == pk::DictType::kOrderedDict ? ordered_dict_()
                         : node.dict_type == pk::DictType::kCounter   ? counter_()
                                                                      : py::dict();
    built_[id] = mapping;
    for (size_t i = 0; i + 1 < items.size(); i += 2) {
      py::object key = convert(items[i], depth + 1);
      py::object value = convert(items[i + 1], depth + 1);
      if (PyObject_SetItem(mapping.ptr(), key.ptr(), value.ptr()) != 0) {
        if (!PyErr_ExceptionMatches(PyExc_TypeError)) throw py::error_already_set();
        PyErr_Clear();
        throw CheckpointError(ErrorKind::kCorrupt,
                              std::string("bad pickle: dict key of type ") +
                                  Py_TYPE(key.ptr())->tp_name + " is not hashable");
      }
    }
    return mapping;
  }

  const pk::Tree& tree_;
  py::object interpreter_;
  int max_nesting_;
  std::vector<py::object> built_;
  py::object ordered_dict_, counter_, int_from_bytes_, call_at_, persistent_at_, build_at_;
};

template <typename Set>
void fill(Set& target, const py::handle& values) {
  for (py::handle value : values) target.insert(value.cast<std::string>());
}

}  // namespace

pickle::Rules rules_from(const py::dict& rules) {
  pickle::Rules result;
  fill(result.allowed, rules["allowed"]);
  fill(result.torchscript_helpers, rules["torchscript_helpers"]);
  fill(result.trusted, rules["trusted"]);
  for (py::handle module : rules["blocked_modules"]) result.blocked_modules.push_back(module.cast<std::string>());
  for (auto item : rules["module_aliases"].cast<py::dict>()) {
    result.module_aliases[item.first.cast<std::string>()] = item.second.cast<std::string>();
  }
  result.torchscript = rules["torchscript"].cast<bool>();
  result.opaque = rules["opaque"].cast<bool>();
  result.list_blocked = rules["list_blocked"].cast<bool>();
  result.max_values = rules["max_values"].cast<uint64_t>();
  return result;
}

py::object tree_to_python(const pickle::Tree& tree, py::object interpreter, int max_nesting) {
  return TreeConverter(tree, std::move(interpreter), max_nesting).convert_all();
}

}  // namespace pyckpt::bindings
