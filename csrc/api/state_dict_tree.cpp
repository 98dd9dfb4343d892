#include "api/state_dict_tree.h"

#include <unordered_set>

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include "core/error.h"
#include "index/pickle_vm.h"
#include "io/crc32.h"

namespace pyckpt {
namespace {

using pickle::Kind;
using pickle::Node;
using pickle::NodeId;
using pickle::Tree;

constexpr uint64_t kMaxPickleBytes = uint64_t{1} << 30;
const char* const kStateDictKeys[] = {"state_dict", "model_state_dict", "model", "module", "net", "network"};

// What a state dict is made of, and the plain values around it in a training checkpoint.
pickle::Rules state_dict_rules() {
  pickle::Rules rules;
  rules.allowed = {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3",
                   "torch._utils._rebuild_parameter", "torch.Size", "builtins.set", "torch.UntypedStorage"};
  for (const char* storage : {"Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool",
                              "ComplexFloat", "ComplexDouble"}) {
    rules.allowed.insert(std::string("torch.") + storage + "Storage");
  }
  for (const char* dtype : {"float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
                            "bool", "complex64", "complex128", "float8_e4m3fn", "float8_e5m2", "uint16", "uint32",
                            "uint64"}) {
    rules.allowed.insert(std::string("torch.") + dtype);
  }
  rules.blocked_modules = {"os", "sys", "posix", "nt"};
  return rules;
}

c10::ScalarType storage_dtype(const std::string& name) {
  static const std::unordered_map<std::string, c10::ScalarType> types = {
      {"torch\nFloatStorage", c10::kFloat},     {"torch\nDoubleStorage", c10::kDouble},
      {"torch\nHalfStorage", c10::kHalf},       {"torch\nBFloat16Storage", c10::kBFloat16},
      {"torch\nLongStorage", c10::kLong},       {"torch\nIntStorage", c10::kInt},
      {"torch\nShortStorage", c10::kShort},     {"torch\nCharStorage", c10::kChar},
      {"torch\nByteStorage", c10::kByte},       {"torch\nBoolStorage", c10::kBool},
      {"torch\nComplexFloatStorage", c10::kComplexFloat}, {"torch\nComplexDoubleStorage", c10::kComplexDouble},
      {"torch\nUntypedStorage", c10::kByte}};
  const auto found = types.find(name);
  if (found == types.end()) fail("storage type " + name + " is not a storage class");
  return found->second;
}

c10::ScalarType named_dtype(const std::string& name) {
  static const std::unordered_map<std::string, c10::ScalarType> types = {
      {"torch\nfloat32", c10::kFloat}, {"torch\nfloat64", c10::kDouble}, {"torch\nfloat16", c10::kHalf},
      {"torch\nbfloat16", c10::kBFloat16}, {"torch\nint64", c10::kLong}, {"torch\nint32", c10::kInt},
      {"torch\nint16", c10::kShort}, {"torch\nint8", c10::kChar}, {"torch\nuint8", c10::kByte},
      {"torch\nbool", c10::kBool}, {"torch\ncomplex64", c10::kComplexFloat},
      {"torch\ncomplex128", c10::kComplexDouble}, {"torch\nfloat8_e4m3fn", c10::kFloat8_e4m3fn},
      {"torch\nfloat8_e5m2", c10::kFloat8_e5m2}, {"torch\nuint16", c10::kUInt16},
      {"torch\nuint32", c10::kUInt32}, {"torch\nuint64", c10::kUInt64}};
  const auto found = types.find(name);
  if (found == types.end()) fail("dtype " + name + " is not one the C++ API reads");
  return found->second;
}

class Reader {
 public:
  explicit Reader(const Tree& tree) : tree_(tree) {}

  const Node& node(NodeId id) const { return tree_.nodes.at(id); }
  const std::vector<NodeId>& items(NodeId id) const { return tree_.items(node(id)); }
  std::string text(NodeId id) const { return tree_.text(node(id)); }

  // The function a call node calls ("module\nname"), or "" for anything else.
  std::string callee(NodeId id) const {
    const Node& n = node(id);
    if (n.kind != Kind::kCall) return "";
    const Node& f = node(items(id).at(0));
    return f.kind == Kind::kGlobal ? tree_.text(f) : "";
  }
  bool is_tensor(NodeId id) const {
    const std::string name = callee(id);
    return name == "torch._utils\n_rebuild_tensor_v2" || name == "torch._utils\n_rebuild_tensor_v3" ||
           name == "torch._utils\n_rebuild_parameter";
  }
  bool is_state_dict(NodeId id) const {
    const Node& n = node(id);
    if (n.kind != Kind::kDict) return false;
    const auto& pairs = items(id);
    if (pairs.empty()) return false;
    for (size_t i = 0; i < pairs.size(); i += 2) {
      if (node(pairs[i]).kind != Kind::kString || !is_tensor(pairs[i + 1])) return false;
    }
    return true;
  }
  NodeId find_state_dict(NodeId root) const {
    if (is_state_dict(root)) return root;
    if (node(root).kind == Kind::kDict) {
      const auto& pairs = items(root);
      for (const char* wanted : kStateDictKeys) {
        for (size_t i = 0; i < pairs.size(); i += 2) {
          if (node(pairs[i]).kind == Kind::kString && text(pairs[i]) == wanted && is_state_dict(pairs[i + 1])) {
            return pairs[i + 1];
          }
        }
      }
      std::vector<NodeId> holders;
      for (size_t i = 1; i < pairs.size(); i += 2) {
        if (is_state_dict(pairs[i])) holders.push_back(pairs[i]);
      }
      if (holders.size() == 1) return holders[0];
    }
    fail("no state dict found: neither the root nor one of its entries is a mapping of names to tensors "
         "(pickled modules and other objects need the Python package)");
  }

  int64_t integer(NodeId id, const char* what) const {
    const Node& n = node(id);
    if (n.kind != Kind::kInt) fail(std::string(what) + " is not an integer");
    return n.integer;
  }
  std::vector<int64_t> integers(NodeId id, const char* what) const {
    const Node& n = node(id);
    if (n.kind != Kind::kTuple && n.kind != Kind::kList) fail(std::string(what) + " is not a tuple");
    std::vector<int64_t> out;
    for (NodeId item : items(id)) out.push_back(integer(item, what));
    return out;
  }
  bool empty_mapping(NodeId id) const {
    const Node& n = node(id);
    return n.kind == Kind::kDict && items(id).empty() && tree_.extras_of(id) == nullptr;
  }

  TensorSpec tensor(NodeId id, const std::string& key, std::unordered_map<std::string, uint64_t>* storages) const {
    const std::string name = callee(id);
    const auto& call = items(id);
    if (call.size() != 2 || node(call[1]).kind != Kind::kTuple) fail("a malformed tensor call");
    const auto& args = items(call[1]);
    if (name == "torch._utils\n_rebuild_parameter") {
      if (args.size() != 3 || !is_tensor(args[0]) || callee(args[0]) == name) fail("a malformed Parameter");
      if (!empty_mapping(args[2])) fail("a Parameter with backward hooks");
      TensorSpec spec = tensor(args[0], key, storages);
      spec.requires_grad = node(args[1]).kind == Kind::kBool && node(args[1]).flag;
      return spec;
    }
    const bool v3 = name == "torch._utils\n_rebuild_tensor_v3";
    const size_t base = v3 ? 7 : 6;
    if (args.size() != base && args.size() != base + 1) fail("a tensor call with " + std::to_string(args.size()) + " arguments");
    if (args.size() == base + 1 && !empty_mapping(args[base])) {
      fail("a tensor with metadata (conj/neg bits): only the Python package reads it");
    }
    if (!empty_mapping(args[5])) fail("a tensor with backward hooks");
    TensorSpec spec;
    spec.offset = integer(args[1], "storage offset");
    spec.size = integers(args[2], "size");
    spec.stride = integers(args[3], "stride");
    spec.requires_grad = node(args[4]).kind == Kind::kBool && node(args[4]).flag;
    const uint64_t storage_bytes = storage(args[0], &spec);
    if (v3) {
      const Node& dtype = node(args[6]);
      if (dtype.kind != Kind::kGlobal) fail("a tensor dtype that is not a dtype");
      spec.dtype = named_dtype(tree_.text(dtype));
    }
    check_view(spec, storage_bytes, key);
    auto [at, fresh] = storages->emplace(spec.storage, storage_bytes);
    if (!fresh && at->second != storage_bytes) fail("storage '" + spec.storage + "' is declared with two sizes");
    return spec;
  }

 private:
  // Fills spec.storage and spec.dtype from the persistent id; returns the storage's bytes.
  uint64_t storage(NodeId id, TensorSpec* spec) const {
    if (node(id).kind != Kind::kPersistent) fail("a tensor whose storage is not a persistent id");
    const NodeId pid = items(id).at(0);
    const auto& fields = items(pid);
    if (node(pid).kind != Kind::kTuple || fields.size() != 5 || text(fields[0]) != "storage" ||
        node(fields[1]).kind != Kind::kGlobal || node(fields[2]).kind != Kind::kString) {
      fail("a malformed storage persistent id");
    }
    if (node(fields[3]).kind != Kind::kString) fail("storage key and location must be strings");
    spec->storage = text(fields[2]);
    if (spec->storage.empty() || spec->storage.find('/') != std::string::npos || spec->storage == "." ||
        spec->storage == "..") {
      fail("storage key '" + spec->storage + "' is not a plain record name");
    }
    const std::string location = text(fields[3]);
    try {
      (void)c10::Device(location);  // where it was saved: it must at least name a device
    } catch (const c10::Error&) {
      fail("storage '" + spec->storage + "' cannot be restored to location '" + location + "'");
    }
    spec->dtype = storage_dtype(text(fields[1]));
    const int64_t numel = integer(fields[4], "storage size");
    if (numel < 0 || numel > (int64_t{1} << 50)) fail("storage '" + spec->storage + "' declares a size out of range");
    return static_cast<uint64_t>(numel) * c10::elementSize(spec->dtype);
  }

  static void check_view(const TensorSpec& spec, uint64_t storage_bytes, const std::string& key) {
    if (spec.size.size() != spec.stride.size()) fail("tensor '" + key + "': size and stride differ in length");
    if (spec.offset < 0) fail("tensor '" + key + "': a negative storage offset");
    uint64_t last = static_cast<uint64_t>(spec.offset);
    for (size_t d = 0; d < spec.size.size(); ++d) {
      if (spec.size[d] < 0 || spec.stride[d] < 0) fail("tensor '" + key + "': a negative size or stride");
      if (spec.size[d] == 0) return;  // no element: nothing to bound
      if (spec.size[d] > (int64_t{1} << 50) || spec.stride[d] > (int64_t{1} << 50)) {
        fail("tensor '" + key + "': a size or stride out of range");
      }
      last += static_cast<uint64_t>(spec.size[d] - 1) * static_cast<uint64_t>(spec.stride[d]);
    }
    const uint64_t width = c10::elementSize(spec.dtype);
    if ((last + 1) * width > storage_bytes) {
      fail("tensor '" + key + "' reaches past the end of storage '" + spec.storage + "'");
    }
  }

  const Tree& tree_;
};

}  // namespace

ZipIndexView::ZipIndexView(const ByteSource& source, int threads) : entries_(read_zip_entries(source, threads)) {
  if (entries_.empty()) fail("the archive holds no records");
  const std::string& first = entries_.front().name;
  const size_t slash = first.find('/');
  if (slash == std::string::npos) fail("records are not under one top folder: not a torch.save file", first);
  top_ = first.substr(0, slash + 1);
  for (size_t i = 0; i < entries_.size(); ++i) {
    if (entries_[i].name.compare(0, top_.size(), top_) == 0) by_name_.emplace(entries_[i].name.substr(top_.size()), i);
  }
}

const ZipEntry* ZipIndexView::find(const std::string& name) const {
  const auto found = by_name_.find(name);
  return found == by_name_.end() ? nullptr : &entries_[found->second];
}

const ZipEntry& ZipIndexView::record(const std::string& name) const {
  const ZipEntry* entry = find(name);
  if (entry == nullptr) fail("the archive has no record '" + top_ + name + "'");
  return *entry;
}

StateDictSpec read_state_dict_spec(const ByteSource& source, const ZipIndexView& zip) {
  if (const ZipEntry* order = zip.find("byteorder")) {
    if (order->method != kMethodStored || order->size > 16) fail("a malformed byteorder record", order->name);
    const auto bytes = source.read(order->data_offset, order->size);
    if (std::string(bytes.begin(), bytes.end()) != "little") {
      fail("a big-endian checkpoint: only the Python package swaps its bytes", order->name);
    }
  }
  const ZipEntry& pickle_entry = zip.record("data.pkl");
  if (pickle_entry.method != kMethodStored) fail("data.pkl is compressed: only the Python package inflates it", pickle_entry.name);
  if (pickle_entry.size > kMaxPickleBytes) fail("data.pkl is larger than 1 GiB", pickle_entry.name);
  const std::vector<uint8_t> data = source.read(pickle_entry.data_offset, pickle_entry.size);
  const uint32_t crc = crc32_update(0, data.data(), data.size());
  if (pickle_entry.crc32 != 0 && crc != pickle_entry.crc32) fail("CRC32 mismatch in data.pkl", pickle_entry.name);
  const Tree tree = pickle::unpickle(data.data(), data.size(), 0, state_dict_rules());
  const Reader reader(tree);
  const NodeId state = reader.find_state_dict(tree.root);
  StateDictSpec spec;
  std::unordered_map<std::string, uint64_t> storages;
  const auto& pairs = reader.items(state);
  for (size_t i = 0; i < pairs.size(); i += 2) {
    const std::string key = reader.text(pairs[i]);
    spec.tensors.emplace_back(key, reader.tensor(pairs[i + 1], key, &storages));
  }
  std::unordered_set<std::string> listed;
  for (const auto& [key, tensor] : spec.tensors) {
    if (listed.insert(tensor.storage).second) spec.storages.push_back({tensor.storage, storages.at(tensor.storage)});
  }
  return spec;
}

}  // namespace pyckpt
