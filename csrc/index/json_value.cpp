#include "index/json_value.h"

#include <cctype>
#include <cstring>
#include <unordered_set>

#include "core/error.h"

namespace pyckpt {
namespace {

// Python's json gives up near the interpreter's recursion limit (about 1000); a header that
// nests even 100 deep is not a checkpoint's.
constexpr int kMaxDepth = 128;
// A value takes about 100 bytes here against 2 in the text ("0,"), so a 100 MB document of
// small numbers would need 5 GB. A header of 400,000 tensors needs under 4 million values.
constexpr size_t kMaxValues = size_t{1} << 22;

class Parser {
 public:
  Parser(const std::string& document, const std::string& what) : s_(document), what_(what) {}

  JsonValue document() {
    check_utf8();
    skip_space();
    JsonValue value = parse_value(0);
    skip_space();
    if (at_ != s_.size()) invalid("extra data after the document");
    return value;
  }

 private:
  [[noreturn]] void invalid(const std::string& why) const {
    fail(what_ + " is not valid JSON (" + why + " at byte " + std::to_string(at_) + ")");
  }

  // Python decodes the bytes as strict UTF-8 before parsing: overlong forms, surrogates and
  // code points past U+10FFFF are refused.
  void check_utf8() {
    const auto* bytes = reinterpret_cast<const unsigned char*>(s_.data());
    for (size_t i = 0; i < s_.size();) {
      const unsigned char lead = bytes[i];
      size_t length = lead < 0x80 ? 1 : (lead >> 5) == 0x6 ? 2 : (lead >> 4) == 0xE ? 3 : (lead >> 3) == 0x1E ? 4 : 0;
      if (length == 0 || i + length > s_.size()) utf8_error(i);
      uint32_t code = length == 1 ? lead : lead & (0x7F >> length);
      for (size_t k = 1; k < length; ++k) {
        if ((bytes[i + k] & 0xC0) != 0x80) utf8_error(i);
        code = (code << 6) | (bytes[i + k] & 0x3F);
      }
      const uint32_t smallest[] = {0, 0, 0x80, 0x800, 0x10000};
      if (code < smallest[length] || code > 0x10FFFF || (code >= 0xD800 && code <= 0xDFFF)) utf8_error(i);
      i += length;
    }
  }
  [[noreturn]] void utf8_error(size_t i) const {
    fail(what_ + " is not valid JSON ('utf-8' codec can't decode byte at position " + std::to_string(i) + ")");
  }

  void skip_space() {
    while (at_ < s_.size() && (s_[at_] == ' ' || s_[at_] == '\t' || s_[at_] == '\n' || s_[at_] == '\r')) ++at_;
  }
  bool take(const char* word) {
    const size_t n = std::strlen(word);
    if (s_.compare(at_, n, word) != 0) return false;
    at_ += n;
    return true;
  }

  JsonValue parse_value(int depth) {
    if (at_ >= s_.size()) invalid("expecting a value");
    if (++values_ > kMaxValues) fail(what_ + " holds more than " + std::to_string(kMaxValues) + " JSON values");
    JsonValue value;
    const char c = s_[at_];
    if (c == '{' || c == '[') {
      if (depth >= kMaxDepth) fail(what_ + " nests too deeply");
      return c == '{' ? parse_object(depth + 1) : parse_array(depth + 1);
    }
    if (c == '"') {
      value.type = JsonValue::Type::kString;
      value.text = parse_string();
    } else if (take("null")) {
      value.type = JsonValue::Type::kNull;
    } else if (take("true") || take("false")) {
      value.type = JsonValue::Type::kBool;
      value.boolean = c == 't';
    } else if (take("NaN")) {
      value.type = JsonValue::Type::kNumber;
      value.text = "nan";
    } else if (take("Infinity") || take("-Infinity")) {
      value.type = JsonValue::Type::kNumber;
      value.text = c == '-' ? "-inf" : "inf";
    } else if (c == '-' || (c >= '0' && c <= '9')) {
      parse_number(value);
    } else {
      invalid("expecting a value");
    }
    return value;
  }

  void parse_number(JsonValue& value) {
    const size_t start = at_;
    value.type = JsonValue::Type::kNumber;
    if (s_[at_] == '-') ++at_;
    if (at_ < s_.size() && s_[at_] == '0') {
      ++at_;
    } else if (at_ < s_.size() && s_[at_] >= '1' && s_[at_] <= '9') {
      while (at_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[at_]))) ++at_;
    } else {
      invalid("expecting a value");
    }
    value.is_integer = true;
    if (at_ < s_.size() && s_[at_] == '.' && at_ + 1 < s_.size() && std::isdigit(static_cast<unsigned char>(s_[at_ + 1]))) {
      value.is_integer = false;
      for (++at_; at_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[at_]));) ++at_;
    }
    if (at_ < s_.size() && (s_[at_] == 'e' || s_[at_] == 'E')) {
      size_t exponent = at_ + 1;
      if (exponent < s_.size() && (s_[exponent] == '+' || s_[exponent] == '-')) ++exponent;
      if (exponent < s_.size() && std::isdigit(static_cast<unsigned char>(s_[exponent]))) {
        value.is_integer = false;
        for (at_ = exponent; at_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[at_]));) ++at_;
      }
    }
    value.text = s_.substr(start, at_ - start);
    if (value.is_integer) {
      const bool negative = value.text[0] == '-';
      uint64_t magnitude = 0;
      value.fits_int64 = true;
      for (size_t i = negative ? 1 : 0; i < value.text.size(); ++i) {
        const uint64_t digit = static_cast<uint64_t>(value.text[i] - '0');
        if (magnitude > (UINT64_MAX - digit) / 10) {
          value.fits_int64 = false;
          break;
        }
        magnitude = magnitude * 10 + digit;
      }
      const uint64_t limit = negative ? uint64_t{1} << 63 : (uint64_t{1} << 63) - 1;
      if (magnitude > limit) value.fits_int64 = false;
      if (value.fits_int64) value.integer = negative ? static_cast<int64_t>(0 - magnitude) : static_cast<int64_t>(magnitude);
    }
  }

  std::string parse_string() {
    ++at_;  // the opening quote
    std::string out;
    while (true) {
      if (at_ >= s_.size()) invalid("unterminated string");
      const char c = s_[at_++];
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) invalid("invalid control character");
      if (c != '\\') {
        out += c;
        continue;
      }
      if (at_ >= s_.size()) invalid("unterminated string");
      const char escape = s_[at_++];
      switch (escape) {
        case '"': case '\\': case '/': out += escape; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': append_code_point(out); break;
        default: invalid("invalid \\escape");
      }
    }
  }

  uint32_t hex4() {
    if (at_ + 4 > s_.size()) invalid("invalid \\uXXXX escape");
    uint32_t code = 0;
    for (int i = 0; i < 4; ++i) {
      const char h = s_[at_++];
      const int digit = h >= '0' && h <= '9' ? h - '0' : h >= 'a' && h <= 'f' ? h - 'a' + 10 : h >= 'A' && h <= 'F' ? h - 'A' + 10 : -1;
      if (digit < 0) invalid("invalid \\uXXXX escape");
      code = code * 16 + static_cast<uint32_t>(digit);
    }
    return code;
  }

  void append_code_point(std::string& out) {
    uint32_t code = hex4();
    if (code >= 0xD800 && code <= 0xDBFF && s_.compare(at_, 2, "\\u") == 0) {
      const size_t before = at_;
      at_ += 2;
      const uint32_t low = hex4();
      if (low >= 0xDC00 && low <= 0xDFFF) {
        code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
      } else {
        at_ = before;
      }
    }
    // A lone surrogate is a str Python can hold but UTF-8 cannot: no checkpoint key has one.
    if (code >= 0xD800 && code <= 0xDFFF) invalid("lone surrogate in a \\u escape");
    if (code < 0x80) {
      out += static_cast<char>(code);
    } else if (code < 0x800) {
      out += static_cast<char>(0xC0 | (code >> 6));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else if (code < 0x10000) {
      out += static_cast<char>(0xE0 | (code >> 12));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (code >> 18));
      out += static_cast<char>(0x80 | ((code >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    }
  }

  // After the opening bracket: true when the container closes at once.
  bool closes_empty(char close) {
    ++at_;
    skip_space();
    if (at_ < s_.size() && s_[at_] == close) {
      ++at_;
      return true;
    }
    return false;
  }

  // After an item: true when another follows (a comma), false when the container closes.
  bool another_item(char close) {
    skip_space();
    if (at_ < s_.size() && (s_[at_] == ',' || s_[at_] == close)) return s_[at_++] == ',';
    invalid("expecting ',' delimiter");
  }

  JsonValue parse_array(int depth) {
    JsonValue value;
    value.type = JsonValue::Type::kArray;
    if (closes_empty(']')) return value;
    do {
      skip_space();
      value.items.push_back(parse_value(depth));
    } while (another_item(']'));
    return value;
  }

  JsonValue parse_object(int depth) {
    JsonValue value;
    value.type = JsonValue::Type::kObject;
    if (closes_empty('}')) return value;
    std::unordered_set<std::string> names;
    do {
      skip_space();
      if (at_ >= s_.size() || s_[at_] != '"') invalid("expecting property name enclosed in double quotes");
      std::string name = parse_string();
      skip_space();
      if (at_ >= s_.size() || s_[at_] != ':') invalid("expecting ':' delimiter");
      ++at_;
      skip_space();
      JsonValue member = parse_value(depth);
      if (!names.insert(name).second) fail(what_ + " names '" + name + "' twice");
      value.members.emplace_back(std::move(name), std::move(member));
    } while (another_item('}'));
    return value;
  }

  const std::string& s_;
  const std::string& what_;
  size_t at_ = 0;
  size_t values_ = 0;
};

std::string quoted(const std::string& text) {
  std::string out = "'";
  for (const char c : text) out += c == '\'' ? std::string("\\'") : c == '\\' ? std::string("\\\\") : std::string(1, c);
  return out + "'";
}

}  // namespace

const JsonValue* JsonValue::member(const std::string& name) const {
  for (const auto& [key, value] : members) {
    if (key == name) return &value;
  }
  return nullptr;
}

std::string JsonValue::repr() const {
  switch (type) {
    case Type::kNull: return "None";
    case Type::kBool: return boolean ? "True" : "False";
    case Type::kNumber: return text;
    case Type::kString: return quoted(text);
    case Type::kArray: {
      std::string out = "[";
      for (size_t i = 0; i < items.size(); ++i) out += (i ? ", " : "") + items[i].repr();
      return out + "]";
    }
    case Type::kObject: {
      std::string out = "{";
      for (size_t i = 0; i < members.size(); ++i) {
        out += (i ? ", " : "") + quoted(members[i].first) + ": " + members[i].second.repr();
      }
      return out + "}";
    }
  }
  return "";
}

JsonValue parse_json(const std::string& document, const std::string& what) { return Parser(document, what).document(); }

}  // namespace pyckpt
