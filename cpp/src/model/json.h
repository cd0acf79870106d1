// A strict JSON reader (RFC 8259) driven by the caller's schema, shared by the safetensors header
// parser and octavo.json. It never builds a document tree: the caller asks for each value in
// turn, anything it does not want is skipped without allocating, under a nesting limit, so no
// input can exhaust the stack or grow memory past the size of what it describes. Plus the two
// helpers a writer needs (string escaping, shortest round-trip numbers).
#pragma once

#include <charconv>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

#include <octavo/error.h>

namespace octavo {

// Nesting limit for values skipped (real safetensors headers nest 3 deep, octavo.json 3).
constexpr int kMaxSkipDepth = 64;

// A byte as messages quote it: the character when printable, else its hex code.
inline std::string describe_byte(char c) {
  const auto byte = static_cast<unsigned char>(c);
  if (byte >= 0x20 && byte < 0x7F) return std::string("'") + c + "'";
  static const char* kHex = "0123456789abcdef";
  return std::string("byte 0x") + kHex[byte >> 4] + kHex[byte & 0xF];
}

// Length of the well-formed UTF-8 sequence at p (RFC 3629: no overlongs, no surrogates, at most
// U+10FFFF), or 0 when it is not one.
inline size_t utf8_sequence_length(const unsigned char* p, const unsigned char* end) {
  const unsigned char b0 = p[0];
  size_t len;
  unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b0 < 0x80) return 1;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    len = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    len = 3;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    len = 4;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  if (size_t(end - p) < len) return 0;
  if (p[1] < lo || p[1] > hi) return 0;
  for (size_t i = 2; i < len; ++i) {
    if ((p[i] & 0xC0) != 0x80) return 0;
  }
  return len;
}

inline void append_utf8(std::string& out, uint32_t code_point) {
  if (code_point < 0x80) {
    out += char(code_point);
  } else if (code_point < 0x800) {
    out += char(0xC0 | (code_point >> 6));
    out += char(0x80 | (code_point & 0x3F));
  } else if (code_point < 0x10000) {
    out += char(0xE0 | (code_point >> 12));
    out += char(0x80 | ((code_point >> 6) & 0x3F));
    out += char(0x80 | (code_point & 0x3F));
  } else {
    out += char(0xF0 | (code_point >> 18));
    out += char(0x80 | ((code_point >> 12) & 0x3F));
    out += char(0x80 | ((code_point >> 6) & 0x3F));
    out += char(0x80 | (code_point & 0x3F));
  }
}

struct JsonNumber {
  bool negative = false;
  bool is_integer = true;  // no fraction, no exponent
  bool overflow = false;   // magnitude did not fit in 64 bits
  uint64_t magnitude = 0;
  double value = 0.0;      // the number as the nearest double (+-inf beyond the double range)

  bool is_uint64() const { return is_integer && !overflow && (!negative || magnitude == 0); }
  bool is_int64() const {
    return is_integer && !overflow && magnitude <= (negative ? uint64_t(INT64_MAX) + 1 : uint64_t(INT64_MAX));
  }
  int64_t as_int64() const { return negative ? int64_t(0 - magnitude) : int64_t(magnitude); }
};


// Strict RFC 8259 JSON, read in the order the caller's schema asks for it. Every failure throws
// FormatError prefixed with `context` (the file path and what is being read).
class JsonReader {
 public:
  JsonReader(std::string_view text, std::string context)
      : text_(text), context_(std::move(context)) {}

  [[noreturn]] void fail_at(const std::string& problem) const {
    throw FormatError(context_ + "invalid JSON: " + problem + " at byte " + std::to_string(pos_));
  }
  [[noreturn]] void fail(const std::string& problem) const { throw FormatError(context_ + problem); }

  char peek() {
    skip_whitespace();
    if (pos_ >= text_.size()) fail_at("unexpected end of JSON");
    return text_[pos_];
  }

  bool next_is_string() { return peek() == '"'; }
  bool next_is_number() {
    const char c = peek();
    return c == '-' || (c >= '0' && c <= '9');
  }

  // For the top level: a document that is valid JSON but no object fails as "not a JSON object",
  // anything else as invalid JSON.
  void require_object() {
    if (peek() == '{') return;
    skip_value();
    expect_end();
    fail("not a JSON object");
  }

  void expect_end() {
    skip_whitespace();
    if (pos_ != text_.size()) fail_at("unexpected " + describe_byte(text_[pos_]) + " after the JSON value");
  }

  // Calls on_member(key) for each member; on_member must read or skip exactly the member's value.
  template <typename OnMember>
  void read_object(OnMember&& on_member) {
    expect('{', "'{'");
    if (peek() == '}') {
      ++pos_;
      return;
    }
    for (;;) {
      if (!next_is_string()) fail_at("expected a string key, found " + describe_byte(text_[pos_]));
      const std::string key = read_string();
      expect(':', "':'");
      on_member(key);
      const char c = peek();
      ++pos_;
      if (c == '}') return;
      if (c != ',') fail_at("expected ',' or '}', found " + describe_byte(c));
    }
  }

  // Calls on_element(index) for each element; on_element must read or skip exactly the element.
  template <typename OnElement>
  void read_array(OnElement&& on_element) {
    expect('[', "'['");
    if (peek() == ']') {
      ++pos_;
      return;
    }
    for (size_t index = 0;; ++index) {
      on_element(index);
      const char c = peek();
      ++pos_;
      if (c == ']') return;
      if (c != ',') fail_at("expected ',' or ']', found " + describe_byte(c));
    }
  }

  std::string read_string() {
    expect('"', "a string");
    std::string out;
    for (;;) {
      if (pos_ >= text_.size()) fail_at("unterminated string");
      const auto byte = static_cast<unsigned char>(text_[pos_]);
      if (byte == '"') {
        ++pos_;
        return out;
      }
      if (byte < 0x20) fail_at("control character " + describe_byte(char(byte)) + " inside a string");
      if (byte == '\\') {
        read_escape(out);
        continue;
      }
      const auto* text = reinterpret_cast<const unsigned char*>(text_.data());
      const size_t len = utf8_sequence_length(text + pos_, text + text_.size());
      if (len == 0) fail_at("invalid UTF-8 inside a string");
      out.append(text_.data() + pos_, len);
      pos_ += len;
    }
  }

  JsonNumber read_number() {
    skip_whitespace();
    const size_t start = pos_;
    JsonNumber number;
    if (pos_ < text_.size() && text_[pos_] == '-') {
      number.negative = true;
      ++pos_;
    }
    if (!digit_at(pos_)) fail_at("expected a digit");
    if (text_[pos_] == '0') {
      ++pos_;
      if (digit_at(pos_)) fail_at("leading zero in a number");
    } else {
      while (digit_at(pos_)) {
        const uint64_t digit = uint64_t(text_[pos_++] - '0');
        if (number.magnitude > (UINT64_MAX - digit) / 10) number.overflow = true;
        number.magnitude = number.magnitude * 10 + digit;
      }
    }
    if (pos_ < text_.size() && text_[pos_] == '.') {
      number.is_integer = false;
      ++pos_;
      if (!digit_at(pos_)) fail_at("expected a digit after '.'");
      while (digit_at(pos_)) ++pos_;
    }
    if (pos_ < text_.size() && (text_[pos_] == 'e' || text_[pos_] == 'E')) {
      number.is_integer = false;
      ++pos_;
      if (pos_ < text_.size() && (text_[pos_] == '+' || text_[pos_] == '-')) ++pos_;
      if (!digit_at(pos_)) fail_at("expected a digit in the exponent");
      while (digit_at(pos_)) ++pos_;
    }
    // The grammar above is a subset of what from_chars accepts, so it parses the same span; only
    // magnitude can fail it (beyond the double range: an infinity, refused by callers that care).
    const char* first = text_.data() + start;
    const char* last = text_.data() + pos_;
    const auto [end, error] = std::from_chars(first, last, number.value);
    if (error == std::errc::result_out_of_range) {
      // Beyond the double range: a negative exponent underflowed to 0, anything else overflowed
      // (a 300-digit mantissa with a small negative exponent is misjudged; no real file has one).
      const std::string_view span(first, size_t(last - first));
      const size_t e = span.find_first_of("eE");
      const bool underflow = e != std::string_view::npos && e + 1 < span.size() && span[e + 1] == '-';
      number.value = underflow ? 0.0 : HUGE_VAL;
      if (number.negative) number.value = -number.value;
    } else if (error != std::errc() || end != last) {
      fail_at("malformed number");
    }
    return number;
  }

  // Skips any one value: objects, arrays, strings, numbers, true, false, null.
  void skip_value(int depth = 0) {
    if (depth > kMaxSkipDepth) {
      fail_at("JSON nested deeper than " + std::to_string(kMaxSkipDepth) + " levels");
    }
    const char c = peek();
    if (c == '{') {
      read_object([&](const std::string&) { skip_value(depth + 1); });
    } else if (c == '[') {
      read_array([&](size_t) { skip_value(depth + 1); });
    } else if (c == '"') {
      read_string();
    } else if (c == '-' || (c >= '0' && c <= '9')) {
      read_number();
    } else if (c == 't') {
      expect_literal("true");
    } else if (c == 'f') {
      expect_literal("false");
    } else if (c == 'n') {
      expect_literal("null");
    } else {
      fail_at("unexpected " + describe_byte(c));
    }
  }

 private:
  void skip_whitespace() {
    while (pos_ < text_.size()) {
      const char c = text_[pos_];
      if (c != ' ' && c != '\t' && c != '\n' && c != '\r') return;
      ++pos_;
    }
  }

  bool digit_at(size_t pos) const { return pos < text_.size() && text_[pos] >= '0' && text_[pos] <= '9'; }

  void expect(char c, const char* what) {
    if (peek() != c) fail_at(std::string("expected ") + what + ", found " + describe_byte(text_[pos_]));
    ++pos_;
  }

  void expect_literal(std::string_view literal) {
    if (text_.substr(pos_, literal.size()) != literal) fail_at("invalid literal");
    pos_ += literal.size();
  }

  uint32_t read_hex4() {
    if (text_.size() - pos_ < 4) fail_at("truncated \\u escape");
    uint32_t value = 0;
    for (int i = 0; i < 4; ++i) {
      const char c = text_[pos_++];
      uint32_t digit;
      if (c >= '0' && c <= '9') digit = uint32_t(c - '0');
      else if (c >= 'a' && c <= 'f') digit = uint32_t(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') digit = uint32_t(c - 'A' + 10);
      else fail_at("invalid hex digit " + describe_byte(c) + " in a \\u escape");
      value = value * 16 + digit;
    }
    return value;
  }

  void read_escape(std::string& out) {
    ++pos_;  // the backslash
    if (pos_ >= text_.size()) fail_at("unterminated string");
    const char c = text_[pos_++];
    switch (c) {
      case '"': out += '"'; return;
      case '\\': out += '\\'; return;
      case '/': out += '/'; return;
      case 'b': out += '\b'; return;
      case 'f': out += '\f'; return;
      case 'n': out += '\n'; return;
      case 'r': out += '\r'; return;
      case 't': out += '\t'; return;
      case 'u': break;
      default: fail_at("invalid escape \\" + std::string(1, c));
    }
    uint32_t code_point = read_hex4();
    if (code_point >= 0xDC00 && code_point <= 0xDFFF) fail_at("unpaired low surrogate in a \\u escape");
    if (code_point >= 0xD800 && code_point <= 0xDBFF) {
      if (text_.substr(pos_, 2) != "\\u") fail_at("unpaired high surrogate in a \\u escape");
      pos_ += 2;
      const uint32_t low = read_hex4();
      if (low < 0xDC00 || low > 0xDFFF) fail_at("unpaired high surrogate in a \\u escape");
      code_point = 0x10000 + ((code_point - 0xD800) << 10) + (low - 0xDC00);
    }
    append_utf8(out, code_point);
  }

  std::string_view text_;
  std::string context_;
  size_t pos_ = 0;
};

/// `text` as a JSON string literal (quotes added; ", \\ and control characters escaped). The text is
/// written as is otherwise: callers pass UTF-8.
inline std::string json_quote(std::string_view text) {
  std::string out = "\"";
  for (const char c : text) {
    const auto byte = static_cast<unsigned char>(c);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (byte < 0x20) {
      static const char* kHex = "0123456789abcdef";
      out += "\\u00";
      out += kHex[byte >> 4];
      out += kHex[byte & 0xF];
    } else {
      out += c;
    }
  }
  return out + "\"";
}

/// The shortest decimal that reads back as exactly `value` (a float read as a double and narrowed
/// is the same float). Throws InvalidArgument for NaN and infinities, which JSON cannot hold.
inline std::string json_number(float value, std::string_view what) {
  if (!std::isfinite(value)) {
    throw InvalidArgument(std::string(what) + " is " + std::to_string(value) + "; JSON holds finite numbers only");
  }
  char buffer[64];
  const auto [end, error] = std::to_chars(buffer, buffer + sizeof(buffer), value);
  (void)error;  // 64 bytes hold any float
  std::string text(buffer, end);
  // Keep it visibly a number of the float kind for readers of the file ("1" -> "1.0").
  if (text.find_first_of(".eE") == std::string::npos) text += ".0";
  return text;
}

}  // namespace octavo
