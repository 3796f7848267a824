// Minimal strict JSON value and parser for the .stb header (UTF-8, depth-limited, no duplicate keys).
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace stb {

class JsonValue {
 public:
  enum class Type { Null, Bool, Number, String, Array, Object };

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::Null; }
  bool is_object() const { return type_ == Type::Object; }
  bool is_array() const { return type_ == Type::Array; }
  bool is_string() const { return type_ == Type::String; }
  bool is_number() const { return type_ == Type::Number; }
  bool is_bool() const { return type_ == Type::Bool; }

  // Typed accessors; each throws FormatError naming `what` when the type does not match.
  bool as_bool(const std::string& what) const;
  double as_double(const std::string& what) const;
  // Exact integer in [lo, hi]; a fractional or out-of-range number throws.
  int64_t as_int(const std::string& what, int64_t lo, int64_t hi) const;
  const std::string& as_string(const std::string& what) const;
  const std::vector<JsonValue>& as_array(const std::string& what) const;
  const std::map<std::string, JsonValue>& as_object(const std::string& what) const;

  // Object member lookup: nullptr when absent (or when this is not an object).
  const JsonValue* find(const std::string& key) const;
  // Object member that must exist.
  const JsonValue& at(const std::string& key, const std::string& what) const;

  static JsonValue parse(const char* text, size_t length);  // throws FormatError

 private:
  friend class JsonParser;
  Type type_ = Type::Null;
  bool bool_ = false;
  double number_ = 0;
  bool number_is_int_ = false;
  int64_t int_ = 0;
  std::string string_;
  std::vector<JsonValue> array_;
  std::map<std::string, JsonValue> object_;
};

}  // namespace stb
