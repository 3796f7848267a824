// Strict JSON parser for the .stb header. Depth-limited, rejects duplicate keys, invalid UTF-8 and trailing data,
// so a hostile header cannot exhaust the stack or smuggle two meanings into one file.
#include "stbllm/format.h"
#include "stbllm/json.h"

#include <cerrno>
#include <cmath>
#include <cstring>

namespace stb {

namespace {
constexpr int kMaxDepth = 64;
// A parsed value costs ~270 bytes of memory at peak however short its text ("0," is 2 bytes), so the value count is
// capped too: a header can never make the reader allocate more than ~70 MB. SmolLM2's header (30 layers) holds 4,178
// values; a 70B model's, with the calibration record, about 15,000.
constexpr size_t kMaxValues = 1 << 18;
}

class JsonParser {
 public:
  JsonParser(const char* text, size_t length) : p_(text), begin_(text), end_(text + length) {}

  JsonValue parse_document() {
    JsonValue v = parse_value(0);
    skip_ws();
    if (p_ != end_) fail("trailing data after the JSON document");
    return v;
  }

 private:
  const char* p_;
  const char* begin_;
  const char* end_;
  size_t values_ = 0;

  [[noreturn]] void fail(const std::string& what) {
    throw FormatError("invalid JSON header at byte " + std::to_string(p_ - begin_) + ": " + what);
  }

  void skip_ws() {
    while (p_ < end_ && (*p_ == ' ' || *p_ == '\t' || *p_ == '\n' || *p_ == '\r')) ++p_;
  }

  void expect_literal(const char* lit) {
    size_t n = std::strlen(lit);
    if (size_t(end_ - p_) < n || std::memcmp(p_, lit, n) != 0) fail("unexpected token");
    p_ += n;
  }

  JsonValue parse_value(int depth) {
    if (depth > kMaxDepth) fail("nesting deeper than 64");
    if (++values_ > kMaxValues) fail("more than " + std::to_string(kMaxValues) + " values");
    skip_ws();
    if (p_ >= end_) fail("unexpected end of input");
    JsonValue v;
    switch (*p_) {
      case '{': parse_object(v, depth); break;
      case '[': parse_array(v, depth); break;
      case '"': v.type_ = JsonValue::Type::String; v.string_ = parse_string(); break;
      case 't': expect_literal("true"); v.type_ = JsonValue::Type::Bool; v.bool_ = true; break;
      case 'f': expect_literal("false"); v.type_ = JsonValue::Type::Bool; v.bool_ = false; break;
      case 'n': expect_literal("null"); break;
      default: parse_number(v); break;
    }
    return v;
  }

  void parse_object(JsonValue& v, int depth) {
    v.type_ = JsonValue::Type::Object;
    ++p_;
    skip_ws();
    if (p_ < end_ && *p_ == '}') { ++p_; return; }
    for (;;) {
      skip_ws();
      if (p_ >= end_ || *p_ != '"') fail("expected a string key");
      std::string key = parse_string();
      skip_ws();
      if (p_ >= end_ || *p_ != ':') fail("expected ':'");
      ++p_;
      JsonValue member = parse_value(depth + 1);
      if (!v.object_.emplace(std::move(key), std::move(member)).second) fail("duplicate key");
      skip_ws();
      if (p_ >= end_) fail("unterminated object");
      if (*p_ == ',') { ++p_; continue; }
      if (*p_ == '}') { ++p_; return; }
      fail("expected ',' or '}'");
    }
  }

  void parse_array(JsonValue& v, int depth) {
    v.type_ = JsonValue::Type::Array;
    ++p_;
    skip_ws();
    if (p_ < end_ && *p_ == ']') { ++p_; return; }
    for (;;) {
      v.array_.push_back(parse_value(depth + 1));
      skip_ws();
      if (p_ >= end_) fail("unterminated array");
      if (*p_ == ',') { ++p_; continue; }
      if (*p_ == ']') { ++p_; return; }
      fail("expected ',' or ']'");
    }
  }

  static void append_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out += char(cp);
    } else if (cp < 0x800) {
      out += char(0xC0 | (cp >> 6));
      out += char(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += char(0xE0 | (cp >> 12));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    } else {
      out += char(0xF0 | (cp >> 18));
      out += char(0x80 | ((cp >> 12) & 0x3F));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    }
  }

  uint32_t parse_hex4() {
    if (end_ - p_ < 4) fail("truncated \\u escape");
    uint32_t cp = 0;
    for (int i = 0; i < 4; ++i) {
      char c = *p_++;
      cp <<= 4;
      if (c >= '0' && c <= '9') cp |= uint32_t(c - '0');
      else if (c >= 'a' && c <= 'f') cp |= uint32_t(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') cp |= uint32_t(c - 'A' + 10);
      else fail("bad hex digit in \\u escape");
    }
    return cp;
  }

  // Copies one UTF-8 encoded code point, rejecting overlong forms, surrogates and truncation.
  void copy_utf8_char(std::string& out) {
    unsigned char c = static_cast<unsigned char>(*p_);
    int extra;
    uint32_t cp;
    if (c < 0x80) { out += char(c); ++p_; return; }
    if ((c & 0xE0) == 0xC0) { extra = 1; cp = c & 0x1F; }
    else if ((c & 0xF0) == 0xE0) { extra = 2; cp = c & 0x0F; }
    else if ((c & 0xF8) == 0xF0) { extra = 3; cp = c & 0x07; }
    else fail("invalid UTF-8");
    if (end_ - p_ <= extra) fail("truncated UTF-8");
    for (int i = 1; i <= extra; ++i) {
      unsigned char cc = static_cast<unsigned char>(p_[i]);
      if ((cc & 0xC0) != 0x80) fail("invalid UTF-8");
      cp = (cp << 6) | (cc & 0x3F);
    }
    static const uint32_t kMin[4] = {0, 0x80, 0x800, 0x10000};
    if (cp < kMin[extra] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) fail("invalid UTF-8");
    out.append(p_, size_t(extra + 1));
    p_ += extra + 1;
  }

  std::string parse_string() {
    ++p_;  // opening quote
    std::string out;
    for (;;) {
      if (p_ >= end_) fail("unterminated string");
      char c = *p_;
      if (c == '"') { ++p_; return out; }
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in string");
      if (c != '\\') { copy_utf8_char(out); continue; }
      ++p_;
      if (p_ >= end_) fail("unterminated escape");
      char e = *p_++;
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t cp = parse_hex4();
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (end_ - p_ < 2 || p_[0] != '\\' || p_[1] != 'u') fail("lone high surrogate");
            p_ += 2;
            uint32_t lo = parse_hex4();
            if (lo < 0xDC00 || lo > 0xDFFF) fail("bad low surrogate");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            fail("lone low surrogate");
          }
          append_utf8(out, cp);
          break;
        }
        default: fail("unknown escape");
      }
    }
  }

  void parse_number(JsonValue& v) {
    const char* start = p_;
    bool is_int = true;
    if (p_ < end_ && *p_ == '-') ++p_;
    if (p_ >= end_ || !(*p_ >= '0' && *p_ <= '9')) fail("unexpected character");
    if (*p_ == '0') ++p_;
    else while (p_ < end_ && *p_ >= '0' && *p_ <= '9') ++p_;
    if (p_ < end_ && *p_ == '.') {
      is_int = false;
      ++p_;
      if (p_ >= end_ || !(*p_ >= '0' && *p_ <= '9')) fail("bad number");
      while (p_ < end_ && *p_ >= '0' && *p_ <= '9') ++p_;
    }
    if (p_ < end_ && (*p_ == 'e' || *p_ == 'E')) {
      is_int = false;
      ++p_;
      if (p_ < end_ && (*p_ == '+' || *p_ == '-')) ++p_;
      if (p_ >= end_ || !(*p_ >= '0' && *p_ <= '9')) fail("bad number");
      while (p_ < end_ && *p_ >= '0' && *p_ <= '9') ++p_;
    }
    std::string token(start, p_);
    v.type_ = JsonValue::Type::Number;
    v.number_ = std::strtod(token.c_str(), nullptr);
    if (!std::isfinite(v.number_)) fail("number out of range");
    if (is_int) {
      errno = 0;
      long long i = std::strtoll(token.c_str(), nullptr, 10);
      if (errno == ERANGE) fail("integer out of the 64-bit range");
      v.number_is_int_ = true;
      v.int_ = i;
    }
  }
};

JsonValue JsonValue::parse(const char* text, size_t length) { return JsonParser(text, length).parse_document(); }

static const char* type_name(JsonValue::Type t) {
  switch (t) {
    case JsonValue::Type::Null: return "null";
    case JsonValue::Type::Bool: return "a boolean";
    case JsonValue::Type::Number: return "a number";
    case JsonValue::Type::String: return "a string";
    case JsonValue::Type::Array: return "an array";
    case JsonValue::Type::Object: return "an object";
  }
  return "?";
}

static void require(const JsonValue& v, JsonValue::Type t, const std::string& what) {
  if (v.type() != t)
    throw FormatError(what + " must be " + type_name(t) + ", found " + type_name(v.type()));
}

bool JsonValue::as_bool(const std::string& what) const { require(*this, Type::Bool, what); return bool_; }
double JsonValue::as_double(const std::string& what) const { require(*this, Type::Number, what); return number_; }

int64_t JsonValue::as_int(const std::string& what, int64_t lo, int64_t hi) const {
  require(*this, Type::Number, what);
  if (!number_is_int_) throw FormatError(what + " must be an integer");
  if (int_ < lo || int_ > hi)
    throw FormatError(what + " = " + std::to_string(int_) + " is outside [" + std::to_string(lo) + ", " +
                      std::to_string(hi) + "]");
  return int_;
}

const std::string& JsonValue::as_string(const std::string& what) const {
  require(*this, Type::String, what);
  return string_;
}
const std::vector<JsonValue>& JsonValue::as_array(const std::string& what) const {
  require(*this, Type::Array, what);
  return array_;
}
const std::map<std::string, JsonValue>& JsonValue::as_object(const std::string& what) const {
  require(*this, Type::Object, what);
  return object_;
}

const JsonValue* JsonValue::find(const std::string& key) const {
  if (type_ != Type::Object) return nullptr;
  auto it = object_.find(key);
  return it == object_.end() ? nullptr : &it->second;
}

const JsonValue& JsonValue::at(const std::string& key, const std::string& what) const {
  const JsonValue* v = find(key);
  if (!v) throw FormatError(what + " is missing key '" + key + "'");
  return *v;
}

}  // namespace stb
