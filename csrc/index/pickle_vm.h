// The restricted unpickler: the native twin of pyckpt/index/pickle_vm.py.
//
// By default it accepts exactly the opcodes of torch's weights-only unpickler (protocol 2
// plus EMPTY_SET) and the globals on the allowlist it is given; in opaque mode it also reads
// protocols 3 to 5 and keeps other globals as opaque names. It never interprets a call: it
// builds a tree (an arena of nodes) in which REDUCE/NEWOBJ, BUILD and persistent ids stay
// symbolic, and the bindings hand them to the same Python Interpreter the fallback uses.
// Nothing here recurses, so nesting depth cannot overflow the stack, and every value pushed
// counts against `Rules::max_values`, which bounds the arena.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace pyckpt::pickle {

enum class Kind : uint8_t {
  kNone,
  kBool,        // flag
  kInt,         // integer (fits int64)
  kBigInt,      // text: little-endian two's complement bytes (LONG1/LONG4 wider than 8 bytes)
  kFloat,       // real
  kString,      // text: UTF-8 (surrogates allowed, as Python's "surrogatepass")
  kBytes,       // text: raw bytes; flag: a bytearray (BYTEARRAY8) rather than bytes
  kList,        // items
  kTuple,       // items
  kDict,        // items: key0, value0, key1, value1, ...; dict_type says which mapping
  kSet,         // items
  kFrozenSet,   // items
  kGlobal,      // text: "module\nname", already checked; opaque: beyond the allowlist
  kCall,        // items: [callable, args] or [callable, args, kwargs]; flag: NEWOBJ(_EX)
  kPersistent,  // items: [persistent id]
};

enum class DictType : uint8_t { kDict, kOrderedDict, kCounter };

using NodeId = uint32_t;
constexpr uint32_t kNoIndex = UINT32_MAX;

struct Build {
  NodeId state;
  uint64_t offset;  // of the BUILD opcode, for error messages
};

// Kept small (32 bytes): a hostile pickle may fill the arena up to the value limit.
struct Node {
  Kind kind = Kind::kNone;
  DictType dict_type = DictType::kDict;
  bool flag = false;
  bool opaque = false;
  uint32_t text = kNoIndex;   // index into Tree::texts
  uint32_t items = kNoIndex;  // index into Tree::item_lists
  uint64_t offset = 0;        // of the opcode that made the node
  union {
    int64_t integer = 0;
    double real;
  };
};

// What happened to a node after it was made: BUILD states, and the items APPEND(S) and
// SETITEM(S) gave an opaque object. Few nodes have any, so they live beside the arena.
struct Extras {
  std::vector<Build> builds;
  std::vector<NodeId> appended;
  uint64_t append_offset = 0;
  std::vector<NodeId> set_items;  // key0, value0, ...
  uint64_t set_offset = 0;
};

struct Tree {
  std::deque<Node> nodes;
  std::vector<std::string> texts;
  std::vector<std::vector<NodeId>> item_lists;
  std::unordered_map<NodeId, Extras> extras;
  std::map<std::string, uint64_t> unknown_globals;  // kept opaque (not trusted), with counts
  NodeId root = 0;
  uint64_t end = 0;  // offset just past STOP

  const std::string& text(const Node& node) const;
  const std::vector<NodeId>& items(const Node& node) const;
  const Extras* extras_of(NodeId id) const;
};

// What the file may name and how much it may build. `allowed` are full dotted names; in a
// TorchScript archive, names starting with "__torch__." and the `torchscript_helpers` are
// also accepted. `trusted` names (the user's torch safe globals) are accepted in every mode;
// in opaque mode every other name is too, except those of `blocked_modules` (unless
// `list_blocked`, for inspection).
struct Rules {
  std::unordered_set<std::string> allowed;
  std::unordered_set<std::string> torchscript_helpers;
  std::unordered_set<std::string> trusted;
  std::vector<std::string> blocked_modules;
  std::unordered_map<std::string, std::string> module_aliases;  // Python 2 names
  bool torchscript = false;
  bool opaque = false;
  bool list_blocked = false;
  uint64_t max_values = uint64_t{1} << 25;  // pushes plus memo stores
};

Tree unpickle(const uint8_t* data, size_t size, size_t start, const Rules& rules);

struct GlobalName {
  std::string module;
  std::string name;
  bool allowed;  // on the allowlist (or a TorchScript name): resolved to a torch symbol
  bool unknown;  // kept opaque and not trusted: reported by unknown_globals
};

// What a GLOBAL names, or CheckpointError (kUnsafe) if it may not be named.
GlobalName check_global(const std::string& module, const std::string& name, const Rules& rules);

}  // namespace pyckpt::pickle
