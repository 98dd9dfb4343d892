// The direct CPU load: pyckpt.load of a plain torch zip checkpoint in one native pass.
//
// On the general path a checkpoint of 50,000 tensors spends its time making a Python record
// for every tensor and storage and then turning the records into torch objects. Here the
// same restricted pickle opcodes make the result directly: containers, strings and numbers as
// Python objects, storages as slices of the file mapping (or freshly read), tensors over them.
//
// It accepts only what a state dict or a training checkpoint of plain values holds: the
// protocol-2 opcodes, OrderedDict, the tensor and parameter rebuilds, and ids of CPU
// storages stored raw in the zip. At anything else, and at anything malformed, it gives up
// (load_direct returns None) and pyckpt.load takes the general path, whose checks and
// messages are then the only ones: this path never decides what is refused, only how fast
// the accepted cases go. It holds the GIL throughout except for the final parallel reads.
#include "bindings/direct_load.h"

#include <torch/extension.h>

#include <algorithm>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/byte_source.h"
#include "core/error.h"
#include "core/window_reader.h"
#include "index/view_check.h"
#include "index/zip_index.h"
#include "io/crc32.h"
#include "io/parallel_read.h"
#include "materialize/host_tensors.h"

namespace py = pybind11;

namespace pyckpt::bindings {
namespace {

namespace mt = pyckpt::materialize;

struct GiveUp {};

constexpr uint64_t kMaxGlobalLine = 1024;  // a GLOBAL's module or name, newline included  // thrown inside to fall back to the general path; never leaves this file

[[noreturn]] void give_up() { throw GiveUp{}; }

enum class Global : uint8_t { kOrderedDict, kRebuildV2, kRebuildV3, kRebuild, kParameter, kStorageType, kDType };

struct Tuple;

// A value on the VM stack. Python objects for what the result can hold; ints and tuples stay
// native until something stores them (a tensor's arguments never become Python objects).
struct Value {
  enum class Kind : uint8_t { kObject, kInt, kTuple, kGlobal, kStorage } kind = Kind::kObject;
  py::object object;  // kObject; kInt once made
  int64_t integer = 0;  // kInt; kGlobal storage types: item size; kStorage: storage index
  Global global = Global::kOrderedDict;  // kGlobal
  at::ScalarType dtype = at::kByte;      // kGlobal storage types and dtypes; kStorage
  std::shared_ptr<Tuple> tuple;          // kTuple: shared by every copy (the memo's too)
};

// A tuple made once as a Python object however often the memo hands it out, as pickle does.
struct Tuple {
  std::vector<Value> items;
  py::object object;
  bool consumed = false;  // its items were dropped after use: fetched again, the general path runs
};

class DirectLoader {
 public:
  DirectLoader(const ByteSource& source, py::object mapping, const py::dict& tables, int threads)
      : source_(source), threads_(threads) {
    if (!mapping.is_none()) {
      mapping_ = mapping.cast<at::Storage>();
      mapped_ = true;
    }
    storage_types_ = tables["storage_types"].cast<py::dict>();
    dtypes_ = tables["dtypes"].cast<py::dict>();
    ordered_dict_ = tables["ordered_dict"];
    parameter_ = tables["parameter"];
    max_values_ = tables["max_values"].cast<uint64_t>();
    max_nesting_ = tables["max_nesting"].cast<int>();
    default_little_ = tables["default_byteorder"].cast<std::string>() == "little";
  }

  py::object load();

 private:
  const ZipEntry* find(const std::string& name) const {
    const auto found = by_name_.find(name);
    return found == by_name_.end() ? nullptr : &entries_[found->second];
  }
  uint32_t crc_of(const ZipEntry& entry) const {  // read through a window, like the run
    WindowReader reader(source_, entry.data_offset, entry.size);
    uint32_t crc = 0;
    while (!reader.at_end()) {
      const uint64_t n = std::min(reader.remaining(), WindowReader::kWindowBytes);
      crc = crc32_update(crc, reader.take(n), static_cast<size_t>(n));
    }
    return crc;
  }
  std::vector<uint8_t> small_record(const ZipEntry& entry, uint64_t limit) const {
    if (entry.method != kMethodStored || entry.size > limit) give_up();
    std::vector<uint8_t> bytes = source_.read(entry.data_offset, entry.size);
    if (entry.crc32 != 0 && crc32_update(0, bytes.data(), bytes.size()) != entry.crc32) give_up();
    return bytes;
  }

  void push(Value value) {
    if (++values_ > max_values_) give_up();
    stack_.push_back(std::move(value));
  }
  bool at_mark() const { return stack_.empty() || (!marks_.empty() && stack_.size() <= marks_.back()); }
  Value pop() {
    if (at_mark()) give_up();
    Value value = std::move(stack_.back());
    stack_.pop_back();
    return value;
  }
  Value& top() {
    if (at_mark()) give_up();
    return stack_.back();
  }
  std::vector<Value> pop_mark() {
    if (marks_.empty()) give_up();
    const size_t base = marks_.back();
    marks_.pop_back();
    std::vector<Value> items(std::make_move_iterator(stack_.begin() + static_cast<std::ptrdiff_t>(base)),
                             std::make_move_iterator(stack_.end()));
    stack_.resize(base);
    return items;
  }
  const uint8_t* take(size_t n) {  // valid until the next take
    const uint8_t* chunk = pickle_->take(n);
    if (chunk == nullptr) give_up();
    return chunk;
  }
  uint32_t u32() {
    const uint8_t* p = take(4);
    return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) | (static_cast<uint32_t>(p[2]) << 16) |
           (static_cast<uint32_t>(p[3]) << 24);
  }
  static Value object(py::object o) {
    Value value;
    value.object = std::move(o);
    return value;
  }
  static Value integer(int64_t v) {
    Value value;
    value.kind = Value::Kind::kInt;
    value.integer = v;
    return value;
  }
  Value text(size_t length, const char* errors);
  Value global(const std::string& module, const std::string& name) const;
  py::object materialize(Value& value);
  void memo_store(uint32_t index) {
    if (++values_ > max_values_) give_up();
    Value& value = top();
    // Picklers number the memo densely; a file that does not is left to the general path.
    if (index > 2 * memo_end_ + 1024) give_up();
    memo_end_ = std::max<uint64_t>(memo_end_, uint64_t{index} + 1);
    // Only what the pickle fetches again is kept, by index: picklers memoise every tensor's
    // tuples, and even a slot per memo index would cost a third of what the tensors do.
    if (index < fetched_.size() && fetched_[index]) memo_[index] = value;
  }
  void scan_fetches(WindowReader pickle);
  static void consume(Value& value) {  // a tuple used up as arguments: its items are not kept
    if (value.kind == Value::Kind::kTuple && !value.tuple->object) {
      value.tuple->items.clear();
      value.tuple->items.shrink_to_fit();
      value.tuple->consumed = true;
    }
  }
  static Value tuple_of(std::vector<Value> items) {
    Value value;
    value.kind = Value::Kind::kTuple;
    value.tuple = std::make_shared<Tuple>();
    value.tuple->items = std::move(items);
    return value;
  }
  Value reduce(Value func, Value args);
  Value tensor(Global form, std::vector<Value>& args);
  Value persistent(Value pid);
  int64_t storage_for(std::string_view key, const Value& type, int64_t numel);
  void set_items(Value& target, std::vector<Value>& items);
  void append(Value& target, std::vector<Value>& items);
  py::object run();
  bool too_deep(const py::handle& root) const;

  const ByteSource& source_;
  at::Storage mapping_;  // the file mapped, when mapped_; else every storage is read
  bool mapped_ = false;
  int threads_;
  py::dict storage_types_, dtypes_;
  py::object ordered_dict_, parameter_;
  uint64_t max_values_ = 0;
  int max_nesting_ = 512;
  bool default_little_ = true;

  std::vector<ZipEntry> entries_;
  std::unordered_map<std::string, size_t> by_name_;  // the few records read by name
  std::string top_;
  // Storage records by key (the name after "<top>/data/"), viewing entries_' names; and the
  // storage made for each record, if any.
  std::unordered_map<std::string_view, size_t> by_key_;
  std::vector<int64_t> slot_of_entry_;

  WindowReader* pickle_ = nullptr;  // data.pkl, read as the run goes
  std::vector<Value> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint32_t, Value> memo_;  // the entries the pickle fetches, by index
  uint64_t memo_end_ = 0;  // one past the highest memo index stored
  std::vector<bool> fetched_;  // memo indices the pickle fetches (BINGET / LONG_BINGET)
  uint64_t values_ = 0;

  struct Slot {
    at::Storage storage;
    uint64_t nbytes;
  };
  std::unordered_map<std::string, int64_t> storage_index_;
  std::vector<Slot> storages_;
  std::vector<ReadJob> reads_;  // into storages allocated fresh, run after the pickle
};

Value DirectLoader::text(size_t length, const char* errors) {
  const uint8_t* bytes = take(length);
  PyObject* decoded = PyUnicode_DecodeUTF8(reinterpret_cast<const char*>(bytes), static_cast<Py_ssize_t>(length), errors);
  if (decoded == nullptr) {
    PyErr_Clear();
    give_up();
  }
  return object(py::reinterpret_steal<py::object>(decoded));
}

Value DirectLoader::global(const std::string& module, const std::string& name) const {
  Value value;
  value.kind = Value::Kind::kGlobal;
  const std::string full = module + "." + name;
  if (full == "collections.OrderedDict") {
    value.global = Global::kOrderedDict;
  } else if (full == "torch._utils._rebuild_tensor_v2") {
    value.global = Global::kRebuildV2;
  } else if (full == "torch._utils._rebuild_tensor_v3") {
    value.global = Global::kRebuildV3;
  } else if (full == "torch._utils._rebuild_tensor") {
    value.global = Global::kRebuild;
  } else if (full == "torch._utils._rebuild_parameter") {
    value.global = Global::kParameter;
  } else if (PyObject* storage = PyDict_GetItemString(storage_types_.ptr(), full.c_str())) {
    py::tuple facts = py::reinterpret_borrow<py::tuple>(storage);
    value.global = Global::kStorageType;
    value.dtype = facts[0].cast<at::ScalarType>();
    value.integer = facts[1].cast<int64_t>();
  } else if (PyObject* dtype = PyDict_GetItemString(dtypes_.ptr(), full.c_str())) {
    value.global = Global::kDType;
    value.dtype = py::handle(dtype).cast<at::ScalarType>();
  } else {
    give_up();  // any other global: the general path decides what becomes of it
  }
  return value;
}

py::object DirectLoader::materialize(Value& value) {
  switch (value.kind) {
    case Value::Kind::kObject:
      return value.object;
    case Value::Kind::kInt:
      if (!value.object) value.object = py::int_(value.integer);
      return value.object;
    case Value::Kind::kTuple:
      if (value.tuple->consumed) give_up();
      if (!value.tuple->object) {
        std::vector<Value>& items = value.tuple->items;
        py::tuple tuple(items.size());
        for (size_t i = 0; i < items.size(); ++i) tuple[i] = materialize(items[i]);
        value.tuple->object = tuple;
      }
      return value.tuple->object;
    default:
      give_up();  // a storage or a global as a value of the result
  }
}

int64_t DirectLoader::storage_for(std::string_view key, const Value& type, int64_t numel) {
  const auto found = by_key_.find(key);
  if (found == by_key_.end()) give_up();
  const size_t entry_index = found->second;
  if (slot_of_entry_[entry_index] >= 0) return slot_of_entry_[entry_index];
  const ZipEntry* entry = &entries_[entry_index];
  if (entry->method != kMethodStored) give_up();
  const unsigned __int128 nbytes = static_cast<unsigned __int128>(numel) * static_cast<uint64_t>(type.integer);
  if (nbytes > entry->size) give_up();
  Slot slot{at::Storage(), static_cast<uint64_t>(nbytes)};
  if (mapped_ && entry->data_offset % 64 == 0) {  // the general path maps exactly these
    slot.storage = mt::slice_storage(mapping_, {{entry->data_offset, slot.nbytes}}).front();
  } else {
    slot.storage = mt::new_host_storage(slot.nbytes);
    if (slot.nbytes) reads_.push_back({entry->data_offset, slot.nbytes, static_cast<uint8_t*>(slot.storage.mutable_data())});
  }
  storages_.push_back(std::move(slot));
  slot_of_entry_[entry_index] = static_cast<int64_t>(storages_.size() - 1);
  return slot_of_entry_[entry_index];
}

std::string_view utf8_of(const py::object& text) {
  Py_ssize_t length = 0;
  const char* data = PyUnicode_AsUTF8AndSize(text.ptr(), &length);
  if (data == nullptr) {
    PyErr_Clear();
    give_up();
  }
  return {data, static_cast<size_t>(length)};
}

bool is_string(const Value& value) { return value.kind == Value::Kind::kObject && PyUnicode_CheckExact(value.object.ptr()); }

Value DirectLoader::persistent(Value pid) {
  if (pid.kind != Value::Kind::kTuple || pid.tuple->consumed) give_up();
  std::vector<Value>& p = pid.tuple->items;
  if (p.size() != 5 && !(p.size() == 6 && p[5].kind == Value::Kind::kObject && p[5].object.is_none())) give_up();
  if (!is_string(p[0]) || utf8_of(p[0].object) != "storage") give_up();
  if (p[1].kind != Value::Kind::kGlobal || p[1].global != Global::kStorageType) give_up();
  if (!is_string(p[2]) || !is_string(p[3]) || p[4].kind != Value::Kind::kInt || p[4].integer < 0) give_up();
  if (utf8_of(p[3].object) != "cpu") give_up();  // storages for elsewhere: the general path
  Value storage;
  storage.kind = Value::Kind::kStorage;
  storage.integer = storage_for(utf8_of(p[2].object), p[1], p[4].integer);
  storage.dtype = p[1].dtype;
  consume(pid);
  return storage;
}

bool int_vector(const Value& value, std::vector<int64_t>* out) {
  if (value.kind != Value::Kind::kTuple || value.tuple->consumed) return false;
  for (const Value& item : value.tuple->items) {
    if (item.kind != Value::Kind::kInt || item.integer < 0) return false;
    out->push_back(item.integer);
  }
  return true;
}

Value DirectLoader::tensor(Global form, std::vector<Value>& a) {
  if (a.size() != (form == Global::kRebuild ? 4u : form == Global::kRebuildV2 ? 6u : 7u)) give_up();
  if (a[0].kind != Value::Kind::kStorage || a[1].kind != Value::Kind::kInt || a[1].integer < 0) give_up();
  std::vector<int64_t> size, stride;
  if (!int_vector(a[2], &size) || !int_vector(a[3], &stride) || size.size() != stride.size()) give_up();
  bool requires_grad = false;
  if (form != Global::kRebuild) {
    if (a[4].kind != Value::Kind::kObject || !PyBool_Check(a[4].object.ptr())) give_up();
    requires_grad = a[4].object.ptr() == Py_True;
    // The backward hooks: an empty OrderedDict, as torch.save writes them.
    if (a[5].kind != Value::Kind::kObject || !py::isinstance(a[5].object, ordered_dict_) || py::len(a[5].object) != 0) {
      give_up();
    }
  }
  at::ScalarType dtype = a[0].dtype;
  if (form == Global::kRebuildV3) {
    if (a[6].kind != Value::Kind::kGlobal || a[6].global != Global::kDType) give_up();
    dtype = a[6].dtype;
  }
  consume(a[2]);
  consume(a[3]);
  const Slot& slot = storages_[static_cast<size_t>(a[0].integer)];
  if (!pyckpt::view_fits(a[1].integer, size, stride, static_cast<int64_t>(c10::elementSize(dtype)), slot.nbytes)) {
    give_up();
  }
  std::vector<at::Storage> one{slot.storage};
  at::Tensor made = mt::make_tensors(one, {{0, dtype, a[1].integer, std::move(size), std::move(stride), requires_grad}})
                        .front();
  return object(py::cast(std::move(made)));
}

// Drops a tuple's items when the call that used them returns.
struct Consumed {
  Value& value;
  ~Consumed() {
    if (value.kind == Value::Kind::kTuple && !value.tuple->object) {
      value.tuple->items.clear();
      value.tuple->items.shrink_to_fit();
      value.tuple->consumed = true;
    }
  }
};

Value DirectLoader::reduce(Value func, Value args) {
  if (func.kind != Value::Kind::kGlobal || args.kind != Value::Kind::kTuple || args.tuple->consumed) give_up();
  Consumed done{args};  // the arguments are used up whatever the call
  std::vector<Value>& a = args.tuple->items;
  switch (func.global) {
    case Global::kOrderedDict:
      if (!a.empty()) give_up();
      return object(ordered_dict_());
    case Global::kRebuildV2:
    case Global::kRebuildV3:
    case Global::kRebuild:
      return tensor(func.global, a);
    case Global::kParameter: {
      if (a.size() != 3 || a[0].kind != Value::Kind::kObject || !THPVariable_Check(a[0].object.ptr())) give_up();
      if (a[1].kind != Value::Kind::kObject || !PyBool_Check(a[1].object.ptr())) give_up();
      return object(parameter_(a[0].object, a[1].object));
    }
    default:
      give_up();
  }
}

void DirectLoader::set_items(Value& target, std::vector<Value>& items) {
  if (target.kind != Value::Kind::kObject || !PyDict_Check(target.object.ptr()) || items.size() % 2) give_up();
  for (size_t i = 0; i < items.size(); i += 2) {
    py::object key = materialize(items[i]);
    py::object value = materialize(items[i + 1]);
    if (PyObject_SetItem(target.object.ptr(), key.ptr(), value.ptr()) != 0) {
      PyErr_Clear();  // an unhashable key: the general path says so
      give_up();
    }
  }
}

void DirectLoader::append(Value& target, std::vector<Value>& items) {
  if (target.kind != Value::Kind::kObject || !PyList_CheckExact(target.object.ptr())) give_up();
  for (Value& item : items) {
    if (PyList_Append(target.object.ptr(), materialize(item).ptr()) != 0) throw py::error_already_set();
  }
}

py::object DirectLoader::run() {
  while (true) {
    const uint8_t op = *take(1);
    switch (op) {
      case 'q':  // BINPUT
        memo_store(*take(1));
        break;
      case 'r':  // LONG_BINPUT
        memo_store(u32());
        break;
      case 'h':  // BINGET
      case 'j': {  // LONG_BINGET
        const uint32_t index = op == 'h' ? *take(1) : u32();
        const auto stored = memo_.find(index);
        if (stored == memo_.end()) give_up();
        push(stored->second);
        break;
      }
      case 'X':  // BINUNICODE
        push(text(u32(), "surrogatepass"));
        break;
      case 'U':  // SHORT_BINSTRING
        push(text(*take(1), "strict"));
        break;
      case 'K':
        push(integer(*take(1)));
        break;
      case 'M': {
        const uint8_t* p = take(2);
        push(integer(p[0] | (p[1] << 8)));
        break;
      }
      case 'J':
        push(integer(static_cast<int32_t>(u32())));
        break;
      case 0x8A: {  // LONG1 up to 8 bytes
        const size_t n = *take(1);
        const uint8_t* bytes = take(n);
        if (n > 8) give_up();
        uint64_t value = 0;
        for (size_t i = 0; i < n; ++i) value |= static_cast<uint64_t>(bytes[i]) << (8 * i);
        if (n > 0 && n < 8 && (bytes[n - 1] & 0x80)) value |= ~uint64_t{0} << (8 * n);
        push(integer(static_cast<int64_t>(value)));
        break;
      }
      case 'G': {
        const uint8_t* p = take(8);
        uint64_t bits = 0;
        for (int i = 0; i < 8; ++i) bits = (bits << 8) | p[i];
        double real;
        std::memcpy(&real, &bits, sizeof(real));
        push(object(py::float_(real)));
        break;
      }
      case 'N':
        push(object(py::none()));
        break;
      case 0x88:
      case 0x89:
        push(object(py::bool_(op == 0x88)));
        break;
      case '(':
        marks_.push_back(stack_.size());
        break;
      case ')':
        push(tuple_of({}));
        break;
      case 't':
        push(tuple_of(pop_mark()));
        break;
      case 0x85:
      case 0x86:
      case 0x87: {
        std::vector<Value> items(static_cast<size_t>(op - 0x84));
        for (size_t i = items.size(); i-- > 0;) items[i] = pop();
        push(tuple_of(std::move(items)));
        break;
      }
      case ']':
        push(object(py::list()));
        break;
      case '}':
        push(object(py::dict()));
        break;
      case 0x8F:
        push(object(py::set()));
        break;
      case 'a': {
        std::vector<Value> items;
        items.push_back(pop());
        append(top(), items);
        break;
      }
      case 'e': {
        std::vector<Value> items = pop_mark();
        append(top(), items);
        break;
      }
      case 's': {
        std::vector<Value> items(2);
        items[1] = pop();
        items[0] = pop();
        set_items(top(), items);
        break;
      }
      case 'u': {
        std::vector<Value> items = pop_mark();
        set_items(top(), items);
        break;
      }
      case 'c': {
        auto line = [&]() {
          std::string_view text;
          if (!pickle_->line(kMaxGlobalLine, &text)) give_up();
          return std::string(text);
        };
        const std::string module = line();
        const std::string name = line();
        push(global(module, name));
        break;
      }
      case 'R': {
        Value args = pop();
        Value func = pop();
        push(reduce(std::move(func), std::move(args)));
        break;
      }
      case 'Q':
        push(persistent(pop()));
        break;
      case 'b': {  // BUILD: only an OrderedDict's attributes (a state dict's _metadata)
        Value state = pop();
        Value& target = top();
        if (target.kind != Value::Kind::kObject || !py::type::of(target.object).is(ordered_dict_) ||
            state.kind != Value::Kind::kObject || !PyDict_CheckExact(state.object.ptr())) {
          give_up();
        }
        for (auto item : py::reinterpret_borrow<py::dict>(state.object)) {
          if (!PyUnicode_CheckExact(item.first.ptr())) give_up();
        }
        target.object.attr("__dict__").attr("update")(state.object);
        break;
      }
      case 0x80:
        take(1);
        break;
      case '.': {
        Value result = pop();
        return materialize(result);
      }
      default:
        give_up();
    }
  }
}

// Which memo entries the pickle ever fetches: one pass over the opcodes, sizes only. Any
// opcode the run would not accept ends the scan (the run gives up there anyway).
void DirectLoader::scan_fetches(WindowReader pickle) {
  auto byte = [&](uint32_t* value) {
    const uint8_t* p = pickle.take(1);
    if (p != nullptr) *value = *p;
    return p != nullptr;
  };
  auto u32 = [&](uint32_t* value) {
    const uint8_t* p = pickle.take(4);
    if (p != nullptr) {
      *value = static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) |
               (static_cast<uint32_t>(p[2]) << 16) | (static_cast<uint32_t>(p[3]) << 24);
    }
    return p != nullptr;
  };
  auto fetch = [&](uint32_t index) {
    if (index > (uint32_t{1} << 30)) return;  // the run gives up on it
    if (index >= fetched_.size()) fetched_.resize(static_cast<size_t>(index) + 1, false);
    fetched_[index] = true;
  };
  uint32_t value = 0;
  std::string_view text;
  while (!pickle.at_end()) {
    const uint8_t op = *pickle.take(1);
    bool ok = true;
    switch (op) {
      case 'q': case 'K': case 0x80: ok = pickle.skip(1); break;
      case 'r': case 'J': ok = pickle.skip(4); break;
      case 'M': ok = pickle.skip(2); break;
      case 'G': ok = pickle.skip(8); break;
      case 'h':
        ok = byte(&value);
        if (ok) fetch(value);
        break;
      case 'j':
        ok = u32(&value);
        if (ok) fetch(value);
        break;
      case 'X':
        ok = u32(&value) && pickle.skip(value);
        break;
      case 'U':
      case 0x8A:
        ok = byte(&value) && pickle.skip(value);
        break;
      case 'c':
        ok = pickle.line(kMaxGlobalLine, &text) && pickle.line(kMaxGlobalLine, &text);
        break;
      case '.':
        return;
      case 'N': case 0x88: case 0x89: case '(': case ')': case 't': case 0x85: case 0x86: case 0x87:
      case ']': case '}': case 0x8F: case 'a': case 'e': case 's': case 'u': case 'R': case 'Q': case 'b':
        break;
      default:
        return;
    }
    if (!ok) return;
  }
}

// Deeper than the general path accepts: let it say so.
bool DirectLoader::too_deep(const py::handle& root) const {
  std::vector<std::pair<PyObject*, int>> stack{{root.ptr(), 0}};
  std::unordered_map<PyObject*, bool> seen;
  while (!stack.empty()) {
    auto [object, depth] = stack.back();
    stack.pop_back();
    if (depth > max_nesting_) return true;
    const bool container = PyDict_Check(object) || PyList_Check(object) || PyTuple_Check(object);
    if (!container || !seen.emplace(object, true).second) continue;
    if (PyDict_Check(object)) {
      PyObject *key, *value;
      Py_ssize_t at = 0;
      while (PyDict_Next(object, &at, &key, &value)) stack.emplace_back(value, depth + 1);
      PyObject* attributes = PyObject_GenericGetDict(object, nullptr);
      if (attributes == nullptr) {
        PyErr_Clear();
      } else {
        if (PyDict_Size(attributes) > 0) stack.emplace_back(attributes, depth + 1);
        Py_DECREF(attributes);  // the object keeps it alive
      }
    } else {
      const Py_ssize_t n = PySequence_Fast_GET_SIZE(object);
      PyObject** items = PySequence_Fast_ITEMS(object);
      for (Py_ssize_t i = 0; i < n; ++i) stack.emplace_back(items[i], depth + 1);
    }
  }
  return false;
}

py::object DirectLoader::load() {
  try {
    entries_ = read_zip_entries(source_, threads_);
    if (entries_.empty()) give_up();
    const std::string& first = entries_.front().name;
    const size_t slash = first.find('/');
    if (slash == std::string::npos) give_up();
    top_ = first.substr(0, slash);
    const std::string data_prefix = top_ + "/data/";
    slot_of_entry_.assign(entries_.size(), -1);
    by_key_.reserve(entries_.size());
    for (size_t i = 0; i < entries_.size(); ++i) {
      const std::string& name = entries_[i].name;
      if (name.compare(0, data_prefix.size(), data_prefix) == 0) {
        // Keys that are not plain record names are left to the general path's messages.
        const std::string_view key = std::string_view(name).substr(data_prefix.size());
        if (!key.empty() && key != "." && key != ".." && key.find_first_of(std::string_view("/\\\0", 3)) == std::string_view::npos) {
          by_key_.emplace(key, i);
        }
      } else {
        by_name_.emplace(name, i);
      }
    }
    if (find(top_ + "/constants.pkl") != nullptr) give_up();  // TorchScript
    const ZipEntry* byteorder = find(top_ + "/byteorder");
    if (byteorder != nullptr) {
      const std::vector<uint8_t> order = small_record(*byteorder, 16);
      if (std::string(order.begin(), order.end()) != "little") give_up();
    } else if (!default_little_) {
      give_up();
    }
    const ZipEntry* pickle = find(top_ + "/data.pkl");
    if (pickle == nullptr) give_up();
    if (pickle->method != kMethodStored || pickle->size > (uint64_t{1} << 31)) give_up();
    if (pickle->crc32 != 0 && crc_of(*pickle) != pickle->crc32) give_up();
    WindowReader reader(source_, pickle->data_offset, pickle->size);
    scan_fetches(reader);
    pickle_ = &reader;
    py::object root = run();
    pickle_ = nullptr;
    if (too_deep(root)) give_up();
    {
      py::gil_scoped_release release;
      parallel_read(source_, reads_, threads_);
    }
    return root;
  } catch (const GiveUp&) {
    return py::none();
  } catch (const CheckpointError&) {
    return py::none();  // damaged: the general path names the problem
  } catch (const c10::Error&) {
    return py::none();  // torch refused something (an allocation, requires_grad on ints): likewise
  } catch (py::error_already_set& error) {
    error.restore();
    PyErr_Clear();
    return py::none();
  }
}

}  // namespace

py::object load_direct(const ByteSource& source, py::object mapping, const py::dict& tables, int threads) {
  return DirectLoader(source, std::move(mapping), tables, threads).load();
}

}  // namespace pyckpt::bindings
