#include "bindings/py_tree.h"

#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "bindings/buffer_view.h"
#include "bindings/py_zip.h"
#include "core/error.h"
#include "index/view_check.h"

namespace py = pybind11;

namespace pyckpt::bindings {
namespace {

namespace pk = pyckpt::pickle;

// Makes instances of a slots-only dataclass by setting its member descriptors directly, which
// costs a fraction of running the generated __init__. Used only when the class's __slots__
// are exactly the fields given (else it calls the class), so no field is ever left unset.
class RecordFactory {
 public:
  RecordFactory() = default;
  RecordFactory(py::object type, const std::vector<const char*>& fields) : type_(std::move(type)) {
    py::set slots(type_.attr("__slots__"));
    bool direct = slots.size() == fields.size() && PyType_Check(type_.ptr());
    for (const char* field : fields) {
      py::object descriptor = type_.attr(field);
      direct = direct && slots.contains(py::str(field)) && Py_TYPE(descriptor.ptr()) == &PyMemberDescr_Type;
      descriptors_.push_back(descriptor);
    }
    direct_ = direct;
  }

  py::object make(std::initializer_list<py::handle> values) const {
    if (!direct_) {
      py::tuple args(values.size());
      size_t i = 0;
      for (py::handle value : values) args[i++] = py::reinterpret_borrow<py::object>(value);
      return type_(*args);
    }
    auto* type = reinterpret_cast<PyTypeObject*>(type_.ptr());
    py::object made = py::reinterpret_steal<py::object>(type->tp_alloc(type, 0));
    if (!made) throw py::error_already_set();
    size_t i = 0;
    for (py::handle value : values) {
      PyObject* descriptor = descriptors_[i++].ptr();
      if (Py_TYPE(descriptor)->tp_descr_set(descriptor, made.ptr(), value.ptr()) != 0) throw py::error_already_set();
    }
    return made;
  }

 private:
  py::object type_;
  std::vector<py::object> descriptors_;
  bool direct_ = false;
};

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
    py::tuple fast = interpreter_.attr("fast_path")();
    tensor_record_ = fast[0];
    storage_ref_ = fast[1];
    make_tensor_record_ = RecordFactory(tensor_record_, {"storage", "dtype", "storage_offset", "size", "stride",
                                                         "requires_grad", "metadata"});
    make_storage_ref_ = RecordFactory(storage_ref_, {"storage", "dtype"});
    dtype_type_ = fast[2];
    storage_types_ = fast[3];
    persistent_load_ = fast[4];
    tensor_records_ = fast[5].cast<py::list>();
    py::object zip = fast[6];
    if (!zip.is_none()) {
      zip_directory_ = zip.attr("directory").cast<std::shared_ptr<ZipDirectory>>();
      zip_top_ = zip.attr("top").cast<std::string>();
      zip_big_endian_ = zip.attr("big_endian").cast<bool>();
      zip_storages_ = zip.attr("storages").cast<py::dict>();
      make_storage_record_ = RecordFactory(zip.attr("record_type"),
                                           {"key", "dtype", "nbytes", "location", "record", "data_offset",
                                            "stored_size", "method", "crc32", "byteswap", "record_size", "view_of",
                                            "view_start"});
    }
  }

  py::object convert_all() {
    for (pk::NodeId id = 0; id < tree_.nodes.size(); ++id) {
      const pk::Node& node = tree_.nodes[id];
      if (node.kind == pk::Kind::kCall || node.kind == pk::Kind::kPersistent ||
          (node.kind == pk::Kind::kDict && !inert(id)) || node.kind == pk::Kind::kSet ||
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
        result = tensor_record(items, depth);
        if (result) break;
        py::object func = convert(items[0], depth + 1);
        py::object args = convert(items[1], depth + 1);
        py::object kwargs = items.size() > 2 ? convert(items[2], depth + 1) : py::none();
        result = call_at_(func, args, node.flag, node.offset, kwargs);
        break;
      }
      case pk::Kind::kPersistent:
        result = storage_ref(items[0], depth);
        if (!result) result = persistent_at_(convert(items[0], depth + 1), node.offset);
        break;
    }
    built_[id] = result;
    if (const pk::Extras* extras = tree_.extras_of(id)) apply_extras(result, *extras, depth);
    return result;
  }

  // -- the common records, built here instead of by the Interpreter -------------------------
  //
  // A state dict is mostly _rebuild_tensor_v2 calls over storage persistent ids. For those,
  // when well formed, the records are made here exactly as Interpreter._tensor and
  // Interpreter.persistent make them; anything else (malformed included) returns an empty
  // object and goes to the Interpreter, so its checks and messages stay the only ones.

  const pk::Node* node_of_kind(pk::NodeId id, pk::Kind kind) const {
    const pk::Node& node = tree_.nodes[id];
    return node.kind == kind ? &node : nullptr;
  }

  bool non_negative_int(pk::NodeId id, int64_t* value) const {
    const pk::Node* node = node_of_kind(id, pk::Kind::kInt);
    if (node == nullptr || node->integer < 0) return false;
    *value = node->integer;
    return true;
  }

  bool int_tuple(pk::NodeId id, std::vector<int64_t>* values) const {
    const pk::Node* node = node_of_kind(id, pk::Kind::kTuple);
    if (node == nullptr) return false;
    for (pk::NodeId item : tree_.items(*node)) {
      int64_t value;
      if (!non_negative_int(item, &value)) return false;
      values->push_back(value);
    }
    return true;
  }

  static py::tuple as_tuple(const std::vector<int64_t>& values) {
    py::tuple tuple(values.size());
    for (size_t i = 0; i < values.size(); ++i) tuple[i] = py::int_(values[i]);
    return tuple;
  }

  py::object tensor_record(const std::vector<pk::NodeId>& call, int depth) {
    const pk::Node& func = tree_.nodes[call[0]];
    if (func.kind != pk::Kind::kGlobal || func.opaque || call.size() != 2) return {};
    const std::string& name = tree_.text(func);
    const int form = name == "torch._utils\n_rebuild_tensor_v2"   ? 2
                     : name == "torch._utils\n_rebuild_tensor_v3" ? 3
                     : name == "torch._utils\n_rebuild_tensor"    ? 1
                                                                   : 0;
    const pk::Node* args = node_of_kind(call[1], pk::Kind::kTuple);
    if (form == 0 || args == nullptr) return {};
    const std::vector<pk::NodeId>& a = tree_.items(*args);
    if (a.size() != (form == 1 ? 4u : form == 2 ? 6u : 7u)) return {};  // no metadata: the common case
    int64_t offset;
    std::vector<int64_t> size, stride;
    if (node_of_kind(a[0], pk::Kind::kPersistent) == nullptr || !non_negative_int(a[1], &offset) ||
        !int_tuple(a[2], &size) || !int_tuple(a[3], &stride) || size.size() != stride.size()) {
      return {};
    }
    const pk::Node* requires_grad = form == 1 ? nullptr : node_of_kind(a[4], pk::Kind::kBool);
    if (form != 1 && requires_grad == nullptr) return {};
    py::object ref = convert(a[0], depth + 1);
    const auto facts = ref_facts_.find(ref.ptr());
    if (facts == ref_facts_.end()) return {};  // not one of the fast path's: the Interpreter decides
    if (form >= 2 && !inert(a[5])) convert(a[5], depth + 1);  // the backward hooks, as the Interpreter would
    py::object dtype = form == 3 ? convert(a[6], depth + 1) : facts->second.dtype;
    if (form == 3 && !py::type::of(dtype).is(dtype_type_)) return {};
    if (!pyckpt::view_fits(offset, size, stride, dtype_facts(dtype).itemsize,
                           static_cast<uint64_t>(facts->second.nbytes))) {
      return {};  // plan.check_view reports it, with the key
    }
    py::object record = make_tensor_record_.make({facts->second.storage, dtype, py::int_(offset), as_tuple(size),
                                                  as_tuple(stride),
                                                  py::bool_(requires_grad != nullptr && requires_grad->flag),
                                                  py::none()});
    tensor_records_.append(record);  // its view is checked: not among the Interpreter's unchecked
    return record;
  }

  // An empty dict or OrderedDict nothing was done to: converting it can neither fail nor
  // matter unless something reaches it (and then convert makes it on demand).
  bool inert(pk::NodeId id) const {
    const pk::Node& node = tree_.nodes[id];
    return node.kind == pk::Kind::kDict && tree_.items(node).empty() && tree_.extras_of(id) == nullptr;
  }

  static bool plain_storage_key(const std::string& key) {
    return !key.empty() && key != "." && key != ".." && key.find_first_of(std::string("/\\\0", 3)) == std::string::npos;
  }

  py::object storage_ref(pk::NodeId pid_id, int depth) {
    const pk::Node* pid = node_of_kind(pid_id, pk::Kind::kTuple);
    if (pid == nullptr) return {};
    const std::vector<pk::NodeId>& p = tree_.items(*pid);
    if (p.size() != 5 && !(p.size() == 6 && tree_.nodes[p[5]].kind == pk::Kind::kNone)) return {};
    const pk::Node* tag = node_of_kind(p[0], pk::Kind::kString);
    const pk::Node* type = node_of_kind(p[1], pk::Kind::kGlobal);
    const pk::Node* key = node_of_kind(p[2], pk::Kind::kString);
    const pk::Node* location = node_of_kind(p[3], pk::Kind::kString);
    int64_t numel;
    if (tag == nullptr || type == nullptr || type->opaque || key == nullptr || location == nullptr ||
        !non_negative_int(p[4], &numel) || tree_.text(*tag) != "storage" || !plain_storage_key(tree_.text(*key))) {
      return {};
    }
    std::string type_name = tree_.text(*type);
    type_name[type_name.find('\n')] = '.';
    PyObject* found = PyDict_GetItemString(storage_types_.ptr(), type_name.c_str());
    if (found == nullptr) return {};
    py::object dtype = py::reinterpret_borrow<py::object>(found);
    py::object key_text = convert(p[2], depth + 1);
    py::object location_text = convert(p[3], depth + 1);
    py::object record;
    int64_t nbytes = -1;  // known here for zip records; asked of the record otherwise
    if (zip_directory_) {
      record = zip_storage(tree_.text(*key), key_text, dtype, location_text, numel, &nbytes);
      if (!record) return {};
    } else {  // the legacy format: its own persistent_load, which the Interpreter would call
      try {
        record = persistent_load_(key_text, dtype, location_text, numel, py::none());
      } catch (py::error_already_set&) {
        return {};  // the Interpreter raises it again, with the pickle offset
      }
    }
    py::object ref = make_storage_ref_.make({record, dtype});
    if (nbytes < 0) nbytes = record.attr("nbytes").cast<int64_t>();
    ref_facts_.emplace(ref.ptr(), RefFacts{record, dtype, nbytes});
    return ref;
  }

  // zip_format's persistent_load for a well-formed id, straight from the native directory.
  py::object zip_storage(const std::string& key, const py::object& key_text, const py::object& dtype,
                         const py::object& location, int64_t numel, int64_t* nbytes_out) {
    PyObject* known = PyDict_GetItemWithError(zip_storages_.ptr(), key_text.ptr());
    if (known != nullptr) return py::reinterpret_borrow<py::object>(known);
    if (PyErr_Occurred()) throw py::error_already_set();
    const std::string name = zip_top_ + "/data/" + key;
    const ZipEntry* entry = zip_directory_->find(name);
    if (entry == nullptr) return {};
    const DTypeFacts facts = dtype_facts(dtype);
    const unsigned __int128 nbytes = static_cast<unsigned __int128>(numel) * facts.itemsize;
    if (nbytes > entry->size) return {};
    py::object record = make_storage_record_.make(
        {key_text, dtype, py::int_(static_cast<uint64_t>(nbytes)), location, py::str(name), py::int_(entry->data_offset),
         py::int_(entry->compressed_size), py::int_(entry->method), py::int_(entry->crc32),
         py::bool_(zip_big_endian_ && facts.swap_width > 1), py::int_(entry->size), py::none(), py::int_(0)});
    zip_storages_[key_text] = record;
    *nbytes_out = static_cast<int64_t>(nbytes);
    return record;
  }

  struct DTypeFacts {
    int64_t itemsize;
    int64_t swap_width;  // bytes per unit swapped for a big-endian file (half for complex)
  };

  DTypeFacts dtype_facts(const py::object& dtype) {
    const auto found = dtype_facts_.find(dtype.ptr());
    if (found != dtype_facts_.end()) return found->second;
    const int64_t itemsize = dtype.attr("itemsize").cast<int64_t>();
    const DTypeFacts facts{itemsize, dtype.attr("is_complex").cast<bool>() ? itemsize / 2 : itemsize};
    dtype_facts_.emplace(dtype.ptr(), facts);  // DType objects live as long as the module
    return facts;
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
  py::object tensor_record_, storage_ref_, dtype_type_, storage_types_, persistent_load_;
  py::list tensor_records_;
  std::shared_ptr<ZipDirectory> zip_directory_;
  std::string zip_top_;
  bool zip_big_endian_ = false;
  py::dict zip_storages_;
  RecordFactory make_tensor_record_, make_storage_ref_, make_storage_record_;
  // What the fast path knows of the StorageRefs it made, so tensors need no attribute lookups.
  struct RefFacts {
    py::object storage;
    py::object dtype;
    int64_t nbytes;
  };
  std::unordered_map<PyObject*, RefFacts> ref_facts_;
  std::unordered_map<PyObject*, DTypeFacts> dtype_facts_;
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

void register_unpickler(py::module_& m) {
  m.def(
      "unpickle",
      [](const py::buffer& data, uint64_t start, py::object interpreter, const py::dict& rules, int max_nesting) {
        BufferView view = view_of(data);
        const pickle::Rules parsed = rules_from(rules);
        pickle::Tree tree;
        {
          py::gil_scoped_release release;
          tree = pickle::unpickle(view.data, view.size, start, parsed);
        }
        py::object root = tree_to_python(tree, std::move(interpreter), max_nesting);
        return py::make_tuple(root, tree.end);
      },
      py::arg("data"), py::arg("start"), py::arg("interpreter"), py::arg("rules"), py::arg("max_nesting"));
}

}  // namespace pyckpt::bindings
