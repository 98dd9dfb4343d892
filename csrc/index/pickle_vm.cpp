#include "index/pickle_vm.h"

#include <cstring>
#include <unordered_map>

#include "core/error.h"

namespace pyckpt::pickle {
namespace {

constexpr const char* kTruncated = "pickle is truncated (no STOP before the end of the data)";
constexpr size_t kMaxGlobalLine = 1024;
constexpr const char* kRefusedBuild =
    "refused BUILD: only Parameter, OrderedDict and allowlisted objects may be built";

const char* const kBlockedModules[] = {"sys", "os", "posix", "nt"};

bool is_continuation(uint8_t c) { return (c & 0xC0) == 0x80; }

// Python's UTF-8 decoder acceptance: strict, or "surrogatepass" (encoded U+D800..DFFF ok).
bool valid_utf8(const uint8_t* s, size_t n, bool allow_surrogates) {
  size_t i = 0;
  while (i < n) {
    const uint8_t c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t continuation = 0;
    uint8_t low = 0x80, high = 0xBF;  // allowed range of the first continuation byte
    if (c >= 0xC2 && c <= 0xDF) {
      continuation = 1;
    } else if (c == 0xE0) {
      continuation = 2, low = 0xA0;
    } else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) {
      continuation = 2;
    } else if (c == 0xED) {
      continuation = 2, high = allow_surrogates ? 0xBF : 0x9F;
    } else if (c == 0xF0) {
      continuation = 3, low = 0x90;
    } else if (c >= 0xF1 && c <= 0xF3) {
      continuation = 3;
    } else if (c == 0xF4) {
      continuation = 3, high = 0x8F;
    } else {
      return false;
    }
    if (n - i <= continuation) return false;
    if (s[i + 1] < low || s[i + 1] > high) return false;
    for (size_t k = 2; k <= continuation; ++k) {
      if (!is_continuation(s[i + k])) return false;
    }
    i += continuation + 1;
  }
  return true;
}

[[noreturn]] void bad(uint64_t at, const std::string& message) {
  fail("bad pickle at offset " + std::to_string(at) + ": " + message);
}

[[noreturn]] void truncated() { throw CheckpointError(ErrorKind::kTruncated, kTruncated); }

class Machine {
 public:
  Machine(const uint8_t* data, size_t size, size_t start, const Rules& rules)
      : data_(data), end_(size), pos_(start), rules_(rules) {}

  Tree run();

 private:
  NodeId add(Kind kind, uint64_t at) {
    tree_.nodes.emplace_back();
    tree_.nodes.back().kind = kind;
    tree_.nodes.back().offset = at;
    return static_cast<NodeId>(tree_.nodes.size() - 1);
  }
  Node& node(NodeId id) { return tree_.nodes[id]; }
  void push(NodeId id) { stack_.push_back(id); }

  bool at_mark_boundary() const {
    return stack_.empty() || (!marks_.empty() && stack_.size() <= marks_.back());
  }
  NodeId pop(uint64_t at) {
    if (at_mark_boundary()) bad(at, "stack underflow");
    const NodeId id = stack_.back();
    stack_.pop_back();
    return id;
  }
  NodeId top(uint64_t at) {
    if (at_mark_boundary()) bad(at, "stack underflow");
    return stack_.back();
  }
  std::vector<NodeId> pop_mark(uint64_t at) {
    if (marks_.empty()) bad(at, "no MARK on the stack");
    const size_t base = marks_.back();
    marks_.pop_back();
    std::vector<NodeId> items(stack_.begin() + static_cast<std::ptrdiff_t>(base), stack_.end());
    stack_.resize(base);
    return items;
  }
  const uint8_t* take(size_t n) {
    if (n > end_ - pos_) truncated();
    const uint8_t* chunk = data_ + pos_;
    pos_ += n;
    return chunk;
  }
  uint32_t u32() {
    const uint8_t* p = take(4);
    return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) |
           (static_cast<uint32_t>(p[2]) << 16) | (static_cast<uint32_t>(p[3]) << 24);
  }
  std::string read_line(uint64_t at) {
    const size_t limit = std::min(end_, pos_ + kMaxGlobalLine);
    const void* newline = std::memchr(data_ + pos_, '\n', limit - pos_);
    if (newline == nullptr) bad(at, "GLOBAL name is not terminated within 1024 bytes");
    const size_t length = static_cast<const uint8_t*>(newline) - (data_ + pos_);
    if (!valid_utf8(data_ + pos_, length, false)) bad(at, "GLOBAL name is not UTF-8");
    std::string line(reinterpret_cast<const char*>(data_ + pos_), length);
    pos_ += length + 1;
    return line;
  }
  NodeId string_node(size_t length, bool allow_surrogates, uint64_t at) {
    const uint8_t* bytes = take(length);
    if (!valid_utf8(bytes, length, allow_surrogates)) bad(at, "string is not valid UTF-8");
    const NodeId id = add(Kind::kString, at);
    node(id).text.assign(reinterpret_cast<const char*>(bytes), length);
    return id;
  }
  NodeId int_node(int64_t value, uint64_t at) {
    const NodeId id = add(Kind::kInt, at);
    node(id).integer = value;
    return id;
  }
  NodeId long1(uint64_t at);
  NodeId call(uint64_t at, bool new_object);
  NodeId container_from_call(const std::string& name, NodeId args, uint64_t at, bool new_object);
  void set_items(NodeId target, const std::vector<NodeId>& items, uint64_t at);

  const uint8_t* data_;
  size_t end_;
  size_t pos_;
  const Rules& rules_;
  Tree tree_;
  std::vector<NodeId> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint32_t, NodeId> memo_;
};

NodeId Machine::long1(uint64_t at) {
  const size_t n = *take(1);
  const uint8_t* bytes = take(n);
  if (n <= 8) {
    uint64_t value = 0;
    for (size_t i = 0; i < n; ++i) value |= static_cast<uint64_t>(bytes[i]) << (8 * i);
    if (n > 0 && n < 8 && (bytes[n - 1] & 0x80)) value |= ~uint64_t{0} << (8 * n);
    return int_node(static_cast<int64_t>(value), at);
  }
  const NodeId id = add(Kind::kBigInt, at);
  node(id).text.assign(reinterpret_cast<const char*>(bytes), n);
  return id;
}

// OrderedDict() and Counter() must be mappings while the pickle is still running, because
// SETITEMS fills them; every other call stays symbolic for the Python interpreter.
NodeId Machine::container_from_call(const std::string& name, NodeId args, uint64_t at,
                                    bool new_object) {
  const bool ordered = name == "collections.OrderedDict";
  const bool counter = name == "collections.Counter";
  if (!ordered && !counter) {
    if (new_object && name == "builtins.set" && node(args).kind == Kind::kTuple &&
        node(args).items.empty()) {
      return add(Kind::kSet, at);
    }
    return 0;
  }
  const Node& a = node(args);
  if (a.kind != Kind::kTuple) return 0;
  std::vector<NodeId> items;
  if (a.items.size() == 1 && !new_object) {
    const Node& source = node(a.items[0]);
    if (ordered && source.kind == Kind::kList) {
      for (NodeId pair : source.items) {
        const Node& p = node(pair);
        if ((p.kind != Kind::kTuple && p.kind != Kind::kList) || p.items.size() != 2) return 0;
        items.push_back(p.items[0]);
        items.push_back(p.items[1]);
      }
    } else if (counter && source.kind == Kind::kDict) {
      items = source.items;
    } else {
      return 0;
    }
  } else if (!a.items.empty()) {
    return 0;
  }
  const NodeId id = add(Kind::kDict, at);
  node(id).dict_type = ordered ? DictType::kOrderedDict : DictType::kCounter;
  node(id).items = std::move(items);
  return id;
}

NodeId Machine::call(uint64_t at, bool new_object) {
  const NodeId args = pop(at);
  const NodeId func = pop(at);
  if (node(func).kind != Kind::kGlobal) {
    throw CheckpointError(ErrorKind::kUnsafe,
                          std::string("refused ") + (new_object ? "NEWOBJ" : "REDUCE") +
                              " at offset " + std::to_string(at) +
                              ": the callable is not an allowlisted global");
  }
  const NodeId container = container_from_call(node(func).text, args, at, new_object);
  if (container != 0) return container;
  const NodeId id = add(Kind::kCall, at);
  node(id).flag = new_object;
  node(id).items = {func, args};
  return id;
}

void Machine::set_items(NodeId target, const std::vector<NodeId>& items, uint64_t at) {
  if (node(target).kind != Kind::kDict) bad(at, "SETITEM on something that is not a dict");
  if (items.size() % 2) bad(at, "SETITEMS with an odd number of items");
  std::vector<NodeId>& dict_items = node(target).items;
  dict_items.insert(dict_items.end(), items.begin(), items.end());
}

Tree Machine::run() {
  add(Kind::kNone, 0);  // node 0: a shared None, and "no node" for container_from_call
  while (true) {
    if (pos_ >= end_) truncated();
    const uint64_t at = pos_;
    const uint8_t op = data_[pos_++];
    switch (op) {
      case 'q':  // BINPUT
        memo_[*take(1)] = top(at);
        break;
      case 'r': {  // LONG_BINPUT
        const uint32_t index = u32();
        memo_[index] = top(at);
        break;
      }
      case 'h':  // BINGET
      case 'j': {  // LONG_BINGET
        const uint32_t index = op == 'h' ? *take(1) : u32();
        const auto found = memo_.find(index);
        if (found == memo_.end()) {
          bad(at, "memo index " + std::to_string(index) + " was never stored");
        }
        push(found->second);
        break;
      }
      case 'X': {  // BINUNICODE
        const uint32_t length = u32();
        push(string_node(length, true, at));
        break;
      }
      case 'U': {  // SHORT_BINSTRING (torch decodes it as strict UTF-8)
        const size_t length = *take(1);
        push(string_node(length, false, at));
        break;
      }
      case 'K':  // BININT1
        push(int_node(*take(1), at));
        break;
      case 'M': {  // BININT2
        const uint8_t* p = take(2);
        push(int_node(p[0] | (p[1] << 8), at));
        break;
      }
      case 'J':  // BININT
        push(int_node(static_cast<int32_t>(u32()), at));
        break;
      case 0x8A:  // LONG1
        push(long1(at));
        break;
      case 'G': {  // BINFLOAT, big-endian
        const uint8_t* p = take(8);
        uint64_t bits = 0;
        for (int i = 0; i < 8; ++i) bits = (bits << 8) | p[i];
        double value;
        std::memcpy(&value, &bits, sizeof(value));
        const NodeId id = add(Kind::kFloat, at);
        node(id).real = value;
        push(id);
        break;
      }
      case 'N':  // NONE
        push(0);
        break;
      case 0x88:  // NEWTRUE
      case 0x89: {  // NEWFALSE
        const NodeId id = add(Kind::kBool, at);
        node(id).flag = op == 0x88;
        push(id);
        break;
      }
      case '(':  // MARK
        marks_.push_back(stack_.size());
        break;
      case ')':  // EMPTY_TUPLE
        push(add(Kind::kTuple, at));
        break;
      case 't': {  // TUPLE
        std::vector<NodeId> items = pop_mark(at);
        const NodeId id = add(Kind::kTuple, at);
        node(id).items = std::move(items);
        push(id);
        break;
      }
      case 0x85:  // TUPLE1
      case 0x86:  // TUPLE2
      case 0x87: {  // TUPLE3
        const size_t count = static_cast<size_t>(op - 0x84);
        std::vector<NodeId> items(count);
        for (size_t i = count; i-- > 0;) items[i] = pop(at);
        const NodeId id = add(Kind::kTuple, at);
        node(id).items = std::move(items);
        push(id);
        break;
      }
      case ']':  // EMPTY_LIST
        push(add(Kind::kList, at));
        break;
      case 'a': {  // APPEND
        const NodeId item = pop(at);
        const NodeId target = top(at);
        if (node(target).kind != Kind::kList) bad(at, "APPEND to something that is not a list");
        node(target).items.push_back(item);
        break;
      }
      case 'e': {  // APPENDS
        std::vector<NodeId> items = pop_mark(at);
        const NodeId target = top(at);
        if (node(target).kind != Kind::kList) bad(at, "APPENDS to something that is not a list");
        std::vector<NodeId>& list = node(target).items;
        list.insert(list.end(), items.begin(), items.end());
        break;
      }
      case '}':  // EMPTY_DICT
        push(add(Kind::kDict, at));
        break;
      case 's': {  // SETITEM
        const NodeId value = pop(at);
        const NodeId key = pop(at);
        set_items(top(at), {key, value}, at);
        break;
      }
      case 'u': {  // SETITEMS
        std::vector<NodeId> items = pop_mark(at);
        set_items(top(at), items, at);
        break;
      }
      case 0x8F:  // EMPTY_SET
        push(add(Kind::kSet, at));
        break;
      case 'c': {  // GLOBAL
        const std::string module = read_line(at);
        const std::string name = read_line(at);
        const NodeId id = add(Kind::kGlobal, at);
        node(id).text = check_global(module, name, rules_);
        push(id);
        break;
      }
      case 'R':  // REDUCE
        push(call(at, false));
        break;
      case 0x81:  // NEWOBJ
        push(call(at, true));
        break;
      case 'Q': {  // BINPERSID
        const NodeId pid = pop(at);
        const NodeId id = add(Kind::kPersistent, at);
        node(id).items = {pid};
        push(id);
        break;
      }
      case 'b': {  // BUILD
        const NodeId state = pop(at);
        const NodeId target = top(at);
        const Node& t = node(target);
        // Which calls may be built is the interpreter's decision; plain values never.
        if (t.kind != Kind::kCall && !(t.kind == Kind::kDict && t.dict_type != DictType::kDict)) {
          throw CheckpointError(ErrorKind::kUnsafe, std::string(kRefusedBuild) +
                                                        " (pickle offset " +
                                                        std::to_string(at) + ")");
        }
        node(target).builds.push_back({state, at});
        break;
      }
      case 0x80:  // PROTO
        take(1);
        break;
      case '.':  // STOP
        tree_.root = pop(at);
        tree_.end = pos_;
        return std::move(tree_);
      default: {
        char hex[8];
        std::snprintf(hex, sizeof(hex), "0x%02x", op);
        throw CheckpointError(ErrorKind::kUnsafe,
                              std::string("refused opcode ") + hex + " at offset " +
                                  std::to_string(at) +
                                  ": not one of the protocol-2 opcodes that torch's "
                                  "weights_only unpickler accepts");
      }
    }
  }
}

}  // namespace

std::string check_global(const std::string& raw_module, const std::string& name,
                         const Rules& rules) {
  std::string module = raw_module;
  if (module == "__builtin__") module = "builtins";
  if (module == "copy_reg") module = "copyreg";
  const std::string full = module + "." + name;
  const std::string first = module.substr(0, module.find('.'));
  for (const char* blocked : kBlockedModules) {
    if (module == blocked || first == blocked) {
      throw CheckpointError(ErrorKind::kUnsafe, "refused global " + full + ": module " + module +
                                                    " is always blocked");
    }
  }
  if (rules.allowed.count(full)) return full;
  if (rules.torchscript &&
      (full.rfind("__torch__.", 0) == 0 || rules.torchscript_helpers.count(full))) {
    return full;
  }
  throw CheckpointError(ErrorKind::kUnsafe,
                        "refused global " + full +
                            ": it is not on torch's weights_only allowlist (load with "
                            "weights_only=False only if you trust the file)");
}

Tree unpickle(const uint8_t* data, size_t size, size_t start, const Rules& rules) {
  if (start > size) truncated();
  return Machine(data, size, start, rules).run();
}

}  // namespace pyckpt::pickle
