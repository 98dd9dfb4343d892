// A strict JSON reader for the two JSON documents a checkpoint can hold: a safetensors header
// and a Hugging Face shard index. It accepts what Python's json.loads accepts (NaN and
// Infinity included), keeps object members in document order, and refuses what the Python
// package refuses, with the same words: invalid UTF-8, a key named twice, nesting past a
// fixed depth. Unlike Python it also refuses a document of more than 4 million values, so
// that memory stays bounded (about 100 bytes a value); no real header comes near that.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace pyckpt {

struct JsonValue {
  enum class Type { kNull, kBool, kNumber, kString, kArray, kObject };
  Type type = Type::kNull;
  bool boolean = false;
  std::string text;          // a string's UTF-8 value, or a number as written
  bool is_integer = false;   // a number without fraction or exponent...
  bool fits_int64 = false;   // ...whose value fits `integer`
  int64_t integer = 0;
  std::vector<JsonValue> items;                             // an array's
  std::vector<std::pair<std::string, JsonValue>> members;  // an object's, in document order

  bool is_object() const { return type == Type::kObject; }
  bool is_array() const { return type == Type::kArray; }
  bool is_string() const { return type == Type::kString; }
  // An exact integer Python would see as int (not bool, not float).
  bool is_int64() const { return type == Type::kNumber && is_integer && fits_int64; }
  const JsonValue* member(const std::string& name) const;
  // The value as Python's repr would print it, for messages ("[1, 2]", "'F33'", "None").
  std::string repr() const;
};

// `document` parsed, or CheckpointError: "<what> is not valid JSON (...)", "<what> nests too
// deeply", "<what> names 'key' twice", "<what> holds more than N JSON values". `what` is
// "safetensors header" or "index".
JsonValue parse_json(const std::string& document, const std::string& what);

}  // namespace pyckpt
