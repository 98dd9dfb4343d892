#include "index/pickle_vm.h"

#include <cstring>

#include "core/error.h"

namespace pyckpt::pickle {
namespace {

constexpr const char* kTruncated = "pickle is truncated (no STOP before the end of the data)";
constexpr size_t kMaxGlobalLine = 1024;
constexpr size_t kMaxLongBytes = size_t{1} << 20;
constexpr const char* kRefusedBuild =
    "refused BUILD: only Parameter, OrderedDict and allowlisted objects may be built";
const std::vector<NodeId> kNoItems;

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

// `opaque_reads_it`: the default mode refuses an opcode opaque mode would read;
// `in_opaque_mode`: even opaque mode refuses it.
[[noreturn]] void refused_opcode(uint8_t op, uint64_t at, bool opaque_reads_it, bool in_opaque_mode) {
  char hex[8];
  std::snprintf(hex, sizeof(hex), "0x%02x", op);
  std::string message = std::string("refused opcode ") + hex + " at offset " + std::to_string(at);
  if (in_opaque_mode) {
    message += ": not one of the opcodes of pickle protocols 2 to 5 that opaque mode reads (text "
               "opcodes of protocols 0 and 1, out-of-band buffers)";
  } else {
    message += ": not one of the protocol-2 opcodes that torch's weights_only unpickler accepts";
    if (opaque_reads_it) message += " (unknown_globals='opaque' reads protocols 2 to 5)";
  }
  throw CheckpointError(ErrorKind::kUnsafe, message);
}

// Opcodes of protocols 1 and 3 to 5 that only opaque mode reads (pickle_vm.py's
// OPAQUE_ONLY_OPCODES).
bool opaque_only(uint8_t op) {
  switch (op) {
    case 0x8C: case 0x8D: case 'B': case 'C': case 0x8E: case 0x96: case 0x93: case 0x94:
    case 0x95: case 0x92: case 0x90: case 0x91: case 0x8B: case '0': case '1': case '2':
    case 'T':
      return true;
    default:
      return false;
  }
}

class Machine {
 public:
  Machine(const uint8_t* data, size_t size, size_t start, const Rules& rules)
      : data_(data), end_(size), pos_(start), rules_(rules) {}

  Tree run();

 private:
  NodeId add(Kind kind, uint64_t at) {
    tree_.nodes.emplace_back();
    Node& made = tree_.nodes.back();
    made.kind = kind;
    made.offset = at;
    return static_cast<NodeId>(tree_.nodes.size() - 1);
  }
  Node& node(NodeId id) { return tree_.nodes[id]; }
  std::vector<NodeId>& items_of(NodeId id) {
    Node& n = node(id);
    if (n.items == kNoIndex) {
      n.items = static_cast<uint32_t>(tree_.item_lists.size());
      tree_.item_lists.emplace_back();
    }
    return tree_.item_lists[n.items];
  }
  NodeId with_items(Kind kind, uint64_t at, std::vector<NodeId> items) {
    const NodeId id = add(kind, at);
    items_of(id) = std::move(items);
    return id;
  }
  void set_text(NodeId id, const void* bytes, size_t length) {
    node(id).text = static_cast<uint32_t>(tree_.texts.size());
    tree_.texts.emplace_back(static_cast<const char*>(bytes), length);
  }
  const std::string& text_of(NodeId id) const { return tree_.text(tree_.nodes[id]); }

  void count_value(uint64_t at) {
    if (++values_ > rules_.max_values) {
      fail("pickle pushes more than " + std::to_string(rules_.max_values) + " values (at offset " +
           std::to_string(at) +
           "): far more than real checkpoints of its size need, so it is refused before it "
           "exhausts memory (PYCKPT_MAX_OBJECTS sets the limit)");
    }
  }
  void push(NodeId id, uint64_t at) {
    count_value(at);
    stack_.push_back(id);
  }
  // The memo: picklers number it densely from 0, so a vector holds it; a file that uses
  // huge indices spills them into a map (each store still counts against the value limit).
  void memo_store(uint32_t index, NodeId id, uint64_t at) {
    count_value(at);
    // The vector grows only as fast as entries arrive, so one huge index costs no memory.
    if (index >= dense_memo_.size() && index <= 2 * memo_count_ + 1024) {
      dense_memo_.resize(std::max<size_t>(index + 1, dense_memo_.size() * 2), kNoIndex);
    }
    if (index < dense_memo_.size()) {
      if (dense_memo_[index] == kNoIndex && sparse_memo_.erase(index) == 0) ++memo_count_;
      dense_memo_[index] = id;
    } else if (sparse_memo_.insert_or_assign(index, id).second) {
      ++memo_count_;
    }
  }
  bool memo_fetch(uint32_t index, NodeId* id) const {
    if (index < dense_memo_.size() && dense_memo_[index] != kNoIndex) {
      *id = dense_memo_[index];
      return true;
    }
    const auto found = sparse_memo_.find(index);
    if (found == sparse_memo_.end()) return false;
    *id = found->second;
    return true;
  }

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
  const uint8_t* take(uint64_t n) {
    if (n > end_ - pos_) truncated();
    const uint8_t* chunk = data_ + pos_;
    pos_ += n;
    return chunk;
  }
  uint64_t little(size_t width) {
    const uint8_t* p = take(width);
    uint64_t value = 0;
    for (size_t i = 0; i < width; ++i) value |= static_cast<uint64_t>(p[i]) << (8 * i);
    return value;
  }
  uint32_t u32() { return static_cast<uint32_t>(little(4)); }
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
  NodeId string_node(uint64_t length, bool allow_surrogates, uint64_t at) {
    const uint8_t* bytes = take(length);
    if (!valid_utf8(bytes, length, allow_surrogates)) bad(at, "string is not valid UTF-8");
    const NodeId id = add(Kind::kString, at);
    set_text(id, bytes, length);
    return id;
  }
  NodeId bytes_node(uint64_t length, bool bytearray, uint64_t at) {
    const uint8_t* bytes = take(length);
    const NodeId id = add(Kind::kBytes, at);
    node(id).flag = bytearray;
    set_text(id, bytes, length);
    return id;
  }
  NodeId int_node(int64_t value, uint64_t at) {
    const NodeId id = add(Kind::kInt, at);
    node(id).integer = value;
    return id;
  }
  NodeId global_node(const std::string& module, const std::string& name, uint64_t at);
  NodeId long_int(size_t n, uint64_t at);
  NodeId call(uint64_t at, bool new_object, bool with_kwargs);
  NodeId container_from_call(const std::string& name, NodeId args, uint64_t at, bool new_object);
  bool accepts_mutation(NodeId target) const;
  void set_items(NodeId target, const std::vector<NodeId>& items, uint64_t at);
  void append(NodeId target, const std::vector<NodeId>& items, uint64_t at, const char* op);
  void extended(uint8_t op, uint64_t at);

  const uint8_t* data_;
  size_t end_;
  size_t pos_;
  const Rules& rules_;
  Tree tree_;
  std::vector<NodeId> stack_;
  std::vector<size_t> marks_;
  std::vector<NodeId> dense_memo_;
  std::unordered_map<uint32_t, NodeId> sparse_memo_;
  size_t memo_count_ = 0;  // entries stored (MEMOIZE numbers the next one by it, as pickle does)
  uint64_t values_ = 0;
};

NodeId Machine::global_node(const std::string& module, const std::string& name, uint64_t at) {
  const GlobalName checked = check_global(module, name, rules_);
  const NodeId id = add(Kind::kGlobal, at);
  node(id).opaque = !checked.allowed;
  const std::string packed = checked.module + "\n" + checked.name;
  set_text(id, packed.data(), packed.size());
  if (checked.unknown) ++tree_.unknown_globals[checked.module + "." + checked.name];
  return id;
}

NodeId Machine::long_int(size_t n, uint64_t at) {
  const uint8_t* bytes = take(n);
  if (n <= 8) {
    uint64_t value = 0;
    for (size_t i = 0; i < n; ++i) value |= static_cast<uint64_t>(bytes[i]) << (8 * i);
    if (n > 0 && n < 8 && (bytes[n - 1] & 0x80)) value |= ~uint64_t{0} << (8 * n);
    return int_node(static_cast<int64_t>(value), at);
  }
  const NodeId id = add(Kind::kBigInt, at);
  set_text(id, bytes, n);
  return id;
}

// OrderedDict() and Counter() must be mappings while the pickle is still running, because
// SETITEMS fills them; every other call stays symbolic for the Python interpreter.
NodeId Machine::container_from_call(const std::string& name, NodeId args, uint64_t at,
                                    bool new_object) {
  const bool ordered = name == "collections\nOrderedDict";
  const bool counter = name == "collections\nCounter";
  const Node& a = node(args);
  const std::vector<NodeId>& arg_items = tree_.items(a);
  if (!ordered && !counter) {
    if (new_object && name == "builtins\nset" && a.kind == Kind::kTuple && arg_items.empty()) {
      return add(Kind::kSet, at);
    }
    return 0;
  }
  if (a.kind != Kind::kTuple) return 0;
  std::vector<NodeId> items;
  if (arg_items.size() == 1 && !new_object) {
    const Node& source = node(arg_items[0]);
    if (ordered && source.kind == Kind::kList) {
      for (NodeId pair : tree_.items(source)) {
        const Node& p = node(pair);
        const std::vector<NodeId>& pair_items = tree_.items(p);
        if ((p.kind != Kind::kTuple && p.kind != Kind::kList) || pair_items.size() != 2) return 0;
        items.push_back(pair_items[0]);
        items.push_back(pair_items[1]);
      }
    } else if (counter && source.kind == Kind::kDict) {
      items = tree_.items(source);
    } else {
      return 0;
    }
  } else if (!arg_items.empty()) {
    return 0;
  }
  const NodeId id = with_items(Kind::kDict, at, std::move(items));
  node(id).dict_type = ordered ? DictType::kOrderedDict : DictType::kCounter;
  return id;
}

NodeId Machine::call(uint64_t at, bool new_object, bool with_kwargs) {
  const NodeId kwargs = with_kwargs ? pop(at) : 0;
  const NodeId args = pop(at);
  const NodeId func = pop(at);
  const Node& f = node(func);
  // In opaque mode a class may also come from a call (getattr(Outer, "Inner") names a nested
  // class) or a persistent id (the legacy format's pickled modules); the interpreter checks
  // that it is a class.
  const bool indirect = f.kind == Kind::kCall || f.kind == Kind::kPersistent;
  if (f.kind != Kind::kGlobal && !(rules_.opaque && indirect)) {
    const char* op = with_kwargs ? "NEWOBJ_EX" : new_object ? "NEWOBJ" : "REDUCE";
    throw CheckpointError(ErrorKind::kUnsafe, std::string("refused ") + op + " at offset " +
                                                  std::to_string(at) +
                                                  ": the callable is not an allowlisted global");
  }
  if (f.kind == Kind::kGlobal && !f.opaque && !with_kwargs) {
    const NodeId container = container_from_call(text_of(func), args, at, new_object);
    if (container != 0) return container;
  }
  std::vector<NodeId> parts = {func, args};
  if (with_kwargs) parts.push_back(kwargs);
  const NodeId id = with_items(Kind::kCall, at, std::move(parts));
  node(id).flag = new_object;
  return id;
}

// Only an object made by calling an opaque (or trusted) global may be appended to or given
// items; the interpreter then checks it is an instance, not a class.
bool Machine::accepts_mutation(NodeId target) const {
  const Node& t = tree_.nodes[target];
  if (t.kind != Kind::kCall) return false;
  const Node& func = tree_.nodes[tree_.items(t)[0]];
  return (func.kind == Kind::kGlobal && func.opaque) || func.kind == Kind::kCall ||
         func.kind == Kind::kPersistent;
}

void Machine::set_items(NodeId target, const std::vector<NodeId>& items, uint64_t at) {
  if (items.size() % 2) bad(at, "SETITEMS with an odd number of items");
  if (node(target).kind == Kind::kDict) {
    std::vector<NodeId>& dict_items = items_of(target);
    dict_items.insert(dict_items.end(), items.begin(), items.end());
    return;
  }
  if (!accepts_mutation(target)) bad(at, "SETITEM on something that is not a dict");
  Extras& extras = tree_.extras[target];
  if (extras.set_items.empty()) extras.set_offset = at;
  extras.set_items.insert(extras.set_items.end(), items.begin(), items.end());
}

void Machine::append(NodeId target, const std::vector<NodeId>& items, uint64_t at, const char* op) {
  if (node(target).kind == Kind::kList) {
    std::vector<NodeId>& list = items_of(target);
    list.insert(list.end(), items.begin(), items.end());
    return;
  }
  if (!accepts_mutation(target)) bad(at, std::string(op) + " to something that is not a list");
  Extras& extras = tree_.extras[target];
  if (extras.appended.empty()) extras.append_offset = at;
  extras.appended.insert(extras.appended.end(), items.begin(), items.end());
}

// The opcodes only opaque mode reads (see opaque_only).
void Machine::extended(uint8_t op, uint64_t at) {
  switch (op) {
    case 0x8C:  // SHORT_BINUNICODE
      push(string_node(*take(1), true, at), at);
      break;
    case 0x8D:  // BINUNICODE8
      push(string_node(little(8), true, at), at);
      break;
    case 'T': {  // BINSTRING: a Python 2 str, decoded as torch decodes SHORT_BINSTRING
      const int32_t length = static_cast<int32_t>(u32());
      if (length < 0) bad(at, "negative string length");
      push(string_node(static_cast<uint64_t>(length), false, at), at);
      break;
    }
    case 'C':  // SHORT_BINBYTES
      push(bytes_node(*take(1), false, at), at);
      break;
    case 'B':  // BINBYTES
      push(bytes_node(u32(), false, at), at);
      break;
    case 0x8E:  // BINBYTES8
      push(bytes_node(little(8), false, at), at);
      break;
    case 0x96:  // BYTEARRAY8
      push(bytes_node(little(8), true, at), at);
      break;
    case 0x8B: {  // LONG4
      const int32_t length = static_cast<int32_t>(u32());
      if (length < 0 || static_cast<size_t>(length) > kMaxLongBytes) {
        bad(at, "LONG4 of " + std::to_string(length) + " bytes");
      }
      push(long_int(static_cast<size_t>(length), at), at);
      break;
    }
    case 0x93: {  // STACK_GLOBAL
      const NodeId name = pop(at);
      const NodeId module = pop(at);
      if (node(module).kind != Kind::kString || node(name).kind != Kind::kString) {
        bad(at, "STACK_GLOBAL needs two strings");
      }
      const std::string module_text = text_of(module), name_text = text_of(name);
      if (module_text.find('\n') != std::string::npos || name_text.find('\n') != std::string::npos) {
        bad(at, "STACK_GLOBAL name holds a line break");
      }
      push(global_node(module_text, name_text, at), at);
      break;
    }
    case 0x94:  // MEMOIZE
      memo_store(static_cast<uint32_t>(memo_count_), top(at), at);
      break;
    case 0x95:  // FRAME: only a length hint
      take(8);
      break;
    case 0x92:  // NEWOBJ_EX
      push(call(at, true, true), at);
      break;
    case 0x90: {  // ADDITEMS
      std::vector<NodeId> items = pop_mark(at);
      const NodeId target = top(at);
      if (node(target).kind != Kind::kSet) bad(at, "ADDITEMS to something that is not a set");
      std::vector<NodeId>& set_items = items_of(target);
      set_items.insert(set_items.end(), items.begin(), items.end());
      break;
    }
    case 0x91:  // FROZENSET
      push(with_items(Kind::kFrozenSet, at, pop_mark(at)), at);
      break;
    case '0':  // POP: the top item, or the mark when nothing stands above it
      if (!at_mark_boundary()) {
        stack_.pop_back();
      } else if (!marks_.empty()) {
        marks_.pop_back();
      } else {
        bad(at, "stack underflow");
      }
      break;
    case '1':  // POP_MARK
      pop_mark(at);
      break;
    default:  // '2' DUP
      push(top(at), at);
      break;
  }
}

Tree Machine::run() {
  add(Kind::kNone, 0);  // node 0: a shared None, and "no node" for container_from_call
  while (true) {
    if (pos_ >= end_) truncated();
    const uint64_t at = pos_;
    const uint8_t op = data_[pos_++];
    switch (op) {
      case 'q':  // BINPUT
        memo_store(*take(1), top(at), at);
        break;
      case 'r': {  // LONG_BINPUT
        const uint32_t index = u32();
        memo_store(index, top(at), at);
        break;
      }
      case 'h':  // BINGET
      case 'j': {  // LONG_BINGET
        const uint32_t index = op == 'h' ? *take(1) : u32();
        NodeId found;
        if (!memo_fetch(index, &found)) bad(at, "memo index " + std::to_string(index) + " was never stored");
        push(found, at);
        break;
      }
      case 'X': {  // BINUNICODE
        const uint32_t length = u32();
        push(string_node(length, true, at), at);
        break;
      }
      case 'U': {  // SHORT_BINSTRING (torch decodes it as strict UTF-8)
        const size_t length = *take(1);
        push(string_node(length, false, at), at);
        break;
      }
      case 'K':  // BININT1
        push(int_node(*take(1), at), at);
        break;
      case 'M': {  // BININT2
        const uint8_t* p = take(2);
        push(int_node(p[0] | (p[1] << 8), at), at);
        break;
      }
      case 'J':  // BININT
        push(int_node(static_cast<int32_t>(u32()), at), at);
        break;
      case 0x8A:  // LONG1
        push(long_int(*take(1), at), at);
        break;
      case 'G': {  // BINFLOAT, big-endian
        const uint8_t* p = take(8);
        uint64_t bits = 0;
        for (int i = 0; i < 8; ++i) bits = (bits << 8) | p[i];
        const NodeId id = add(Kind::kFloat, at);
        std::memcpy(&node(id).real, &bits, sizeof(bits));
        push(id, at);
        break;
      }
      case 'N':  // NONE
        push(0, at);
        break;
      case 0x88:  // NEWTRUE
      case 0x89: {  // NEWFALSE
        const NodeId id = add(Kind::kBool, at);
        node(id).flag = op == 0x88;
        push(id, at);
        break;
      }
      case '(':  // MARK
        marks_.push_back(stack_.size());
        break;
      case ')':  // EMPTY_TUPLE
        push(add(Kind::kTuple, at), at);
        break;
      case 't':  // TUPLE
        push(with_items(Kind::kTuple, at, pop_mark(at)), at);
        break;
      case 0x85:  // TUPLE1
      case 0x86:  // TUPLE2
      case 0x87: {  // TUPLE3
        const size_t count = static_cast<size_t>(op - 0x84);
        std::vector<NodeId> items(count);
        for (size_t i = count; i-- > 0;) items[i] = pop(at);
        push(with_items(Kind::kTuple, at, std::move(items)), at);
        break;
      }
      case ']':  // EMPTY_LIST
        push(add(Kind::kList, at), at);
        break;
      case 'a': {  // APPEND
        const NodeId item = pop(at);
        append(top(at), {item}, at, "APPEND");
        break;
      }
      case 'e': {  // APPENDS
        std::vector<NodeId> items = pop_mark(at);
        append(top(at), items, at, "APPENDS");
        break;
      }
      case '}':  // EMPTY_DICT
        push(add(Kind::kDict, at), at);
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
        push(add(Kind::kSet, at), at);
        break;
      case 'c': {  // GLOBAL
        const std::string module = read_line(at);
        const std::string name = read_line(at);
        push(global_node(module, name, at), at);
        break;
      }
      case 'R':  // REDUCE
        push(call(at, false, false), at);
        break;
      case 0x81:  // NEWOBJ
        push(call(at, true, false), at);
        break;
      case 'Q': {  // BINPERSID
        const NodeId pid = pop(at);
        push(with_items(Kind::kPersistent, at, {pid}), at);
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
        tree_.extras[target].builds.push_back({state, at});
        break;
      }
      case 0x80:  // PROTO
        take(1);
        break;
      case '.':  // STOP
        tree_.root = pop(at);
        tree_.end = pos_;
        return std::move(tree_);
      default:
        if (!opaque_only(op)) refused_opcode(op, at, false, rules_.opaque);
        if (!rules_.opaque) refused_opcode(op, at, true, false);
        extended(op, at);
        break;
    }
  }
}

}  // namespace

const std::string& Tree::text(const Node& node) const {
  static const std::string empty;
  return node.text == kNoIndex ? empty : texts[node.text];
}

const std::vector<NodeId>& Tree::items(const Node& node) const {
  return node.items == kNoIndex ? kNoItems : item_lists[node.items];
}

const Extras* Tree::extras_of(NodeId id) const {
  const auto found = extras.find(id);
  return found == extras.end() ? nullptr : &found->second;
}

GlobalName check_global(const std::string& raw_module, const std::string& name,
                        const Rules& rules) {
  const auto alias = rules.module_aliases.find(raw_module);
  const std::string module = alias == rules.module_aliases.end() ? raw_module : alias->second;
  const std::string full = module + "." + name;
  const std::string first = module.substr(0, module.find('.'));
  bool blocked = false;
  for (const std::string& name_blocked : rules.blocked_modules) {
    if (module == name_blocked || first == name_blocked) blocked = true;
  }
  if (blocked && !rules.list_blocked) {
    throw CheckpointError(ErrorKind::kUnsafe, "refused global " + full + ": module " + module +
                                                  " is always blocked");
  }
  if (!blocked && rules.allowed.count(full)) return {module, name, true, false};
  if (rules.torchscript &&
      (full.rfind("__torch__.", 0) == 0 || rules.torchscript_helpers.count(full))) {
    return {module, name, true, false};
  }
  if (!blocked && rules.trusted.count(full)) return {module, name, false, false};
  if (rules.opaque) return {module, name, false, true};
  throw CheckpointError(ErrorKind::kUnsafe,
                        "refused global " + full +
                            ": it is not on torch's weights_only allowlist (load with "
                            "unknown_globals='opaque' to keep it as an inert record, or "
                            "weights_only=False only if you trust the file)");
}

Tree unpickle(const uint8_t* data, size_t size, size_t start, const Rules& rules) {
  if (start > size) truncated();
  return Machine(data, size, start, rules).run();
}

}  // namespace pyckpt::pickle
