// .npy save/load, written out rather than through xtensor's xnpy.hpp so that
// every malformed file ends in a hesse::IoError that names the path and what
// is wrong with it.
//
// The format (numpy's NEP 1): "\x93NUMPY", major and minor version bytes, the
// header length (uint16 LE for 1.0, uint32 LE for 2.0 and 3.0), then a Python
// dict literal such as
//   {'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }
// padded with spaces and ended by '\n' so the data starts on a 64-byte
// boundary, then the raw values.
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <sstream>
#include <vector>

#include "hesse/io.hpp"
#include "../detail.hpp"

namespace hesse {
namespace {

const char kMagic[] = "\x93NUMPY";
constexpr std::size_t kMagicSize = 6;
constexpr std::size_t kAlign = 64;

bool host_is_little_endian() {
  const std::uint16_t one = 1;
  unsigned char first;
  std::memcpy(&first, &one, 1);
  return first == 1;
}

[[noreturn]] void fail(const char* op, const std::string& path, const std::string& what) {
  throw IoError(detail::message(op, "'", path, "': ", what));
}

// ---- header parsing: just enough of Python's literal syntax ----

struct Header {
  std::string descr;
  bool fortran_order = false;
  Shape shape;
};

class HeaderParser {
 public:
  HeaderParser(const std::string& text, const std::string& path) : s_(text), path_(path) {}

  Header parse() {
    Header h;
    bool seen_descr = false, seen_order = false, seen_shape = false;
    expect('{');
    while (true) {
      skip_space();
      if (peek() == '}') break;
      const std::string key = string_literal();
      expect(':');
      if (key == "descr") {
        skip_space();
        if (peek() != '\'' && peek() != '"')
          error("unsupported dtype: 'descr' is not a simple type string (structured arrays are not supported)");
        h.descr = string_literal();
        seen_descr = true;
      } else if (key == "fortran_order") {
        h.fortran_order = boolean();
        seen_order = true;
      } else if (key == "shape") {
        h.shape = tuple();
        seen_shape = true;
      } else {
        error("unexpected key '" + key + "' in the header");
      }
      skip_space();
      if (peek() == ',') ++i_;
      else if (peek() != '}') error("expected ',' or '}' in the header");
    }
    ++i_;
    skip_space();
    if (i_ != s_.size()) error("trailing characters after the header dict");
    if (!seen_descr || !seen_order || !seen_shape)
      error("the header lacks one of the keys 'descr', 'fortran_order', 'shape'");
    return h;
  }

 private:
  [[noreturn]] void error(const std::string& what) const {
    const std::size_t end = s_.find_last_not_of(" \t\r\n");
    fail("load_npy", path_, "corrupt header (" + what + "): " + s_.substr(0, end == std::string::npos ? 0 : end + 1));
  }
  char peek() const { return i_ < s_.size() ? s_[i_] : '\0'; }
  void skip_space() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) ++i_;
  }
  void expect(char c) {
    skip_space();
    if (peek() != c) error(std::string("expected '") + c + "'");
    ++i_;
  }
  std::string string_literal() {
    skip_space();
    const char quote = peek();
    if (quote != '\'' && quote != '"') error("expected a quoted string");
    const std::size_t end = s_.find(quote, i_ + 1);
    if (end == std::string::npos) error("unterminated string");
    std::string out = s_.substr(i_ + 1, end - i_ - 1);
    i_ = end + 1;
    return out;
  }
  bool boolean() {
    skip_space();
    if (s_.compare(i_, 4, "True") == 0) return i_ += 4, true;
    if (s_.compare(i_, 5, "False") == 0) return i_ += 5, false;
    error("'fortran_order' is neither True nor False");
  }
  // (), (n,), (n, m), ... of non-negative integers
  Shape tuple() {
    expect('(');
    Shape shape;
    while (true) {
      skip_space();
      if (peek() == ')') break;
      if (peek() < '0' || peek() > '9') error("a dimension of 'shape' is not a non-negative integer");
      std::size_t v = 0;
      while (peek() >= '0' && peek() <= '9') {
        const std::size_t digit = std::size_t(peek() - '0');
        if (v > (std::numeric_limits<std::size_t>::max() - digit) / 10) error("a dimension of 'shape' overflows");
        v = v * 10 + digit;
        ++i_;
      }
      if (peek() == 'L') ++i_;  // Python 2 longs
      shape.push_back(v);
      skip_space();
      if (peek() == ',') ++i_;
      else if (peek() != ')') error("expected ',' or ')' in 'shape'");
    }
    ++i_;
    return shape;
  }

  const std::string& s_;
  const std::string& path_;
  std::size_t i_ = 0;
};

// ---- dtypes ----

enum class Kind { float_, signed_, unsigned_, bool_ };

struct Dtype {
  Kind kind;
  std::size_t size;
  bool swap;  // stored in the other byte order than the host's
};

Dtype parse_dtype(const std::string& descr, const std::string& path) {
  auto unsupported = [&]() -> Dtype {
    fail("load_npy", path,
         "unsupported dtype '" + descr +
             "' (supported: float64, float32, signed and unsigned integers, bool)");
  };
  if (descr.size() < 3) return unsupported();
  const char order = descr[0], code = descr[1];
  std::size_t size = 0;
  for (std::size_t i = 2; i < descr.size(); ++i) {
    if (descr[i] < '0' || descr[i] > '9') return unsupported();
    size = size * 10 + std::size_t(descr[i] - '0');
    if (size > 16) return unsupported();
  }
  Kind kind;
  switch (code) {
    case 'f': kind = Kind::float_; if (size != 4 && size != 8) return unsupported(); break;
    case 'i': kind = Kind::signed_; if (size != 1 && size != 2 && size != 4 && size != 8) return unsupported(); break;
    case 'u': kind = Kind::unsigned_; if (size != 1 && size != 2 && size != 4 && size != 8) return unsupported(); break;
    case 'b': kind = Kind::bool_; if (size != 1) return unsupported(); break;
    default: return unsupported();
  }
  bool little;
  switch (order) {
    case '<': little = true; break;
    case '>': little = false; break;
    case '|': case '=': little = host_is_little_endian(); break;
    default: return unsupported();
  }
  return {kind, size, size > 1 && little != host_is_little_endian()};
}

template <class T>
double read_as(const unsigned char* p, bool swap) {
  unsigned char bytes[sizeof(T)];
  for (std::size_t i = 0; i < sizeof(T); ++i) bytes[i] = swap ? p[sizeof(T) - 1 - i] : p[i];
  T v;
  std::memcpy(&v, bytes, sizeof(T));
  return static_cast<double>(v);
}

using Reader = double (*)(const unsigned char*, bool);

Reader reader_for(const Dtype& d) {
  switch (d.kind) {
    case Kind::float_: return d.size == 8 ? read_as<double> : read_as<float>;
    case Kind::signed_:
      return d.size == 8 ? read_as<std::int64_t> : d.size == 4 ? read_as<std::int32_t>
                         : d.size == 2 ? read_as<std::int16_t> : read_as<std::int8_t>;
    case Kind::unsigned_:
      return d.size == 8 ? read_as<std::uint64_t> : d.size == 4 ? read_as<std::uint32_t>
                         : d.size == 2 ? read_as<std::uint16_t> : read_as<std::uint8_t>;
    case Kind::bool_: return [](const unsigned char* p, bool) { return *p != 0 ? 1.0 : 0.0; };
  }
  return nullptr;
}

std::vector<unsigned char> read_file(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) fail("load_npy", path, "is a directory, not a file");
  errno = 0;
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("load_npy", path, std::string("cannot open the file: ") + std::strerror(errno));
  std::vector<unsigned char> bytes;
  try {
    bytes.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  } catch (const std::exception& e) {
    fail("load_npy", path, std::string("cannot read the file: ") + e.what());
  }
  if (in.bad()) fail("load_npy", path, "cannot read the file");
  return bytes;
}

std::uint32_t little_uint(const unsigned char* p, std::size_t n) {
  std::uint32_t v = 0;
  for (std::size_t i = n; i-- > 0;) v = (v << 8) | p[i];
  return v;
}

// Reads the file into `out`, which `make` creates once the shape is known.
template <class Make>
void load_into(const std::string& path, Make make) {
  const std::vector<unsigned char> bytes = read_file(path);
  if (bytes.size() < kMagicSize + 2 || std::memcmp(bytes.data(), kMagic, kMagicSize) != 0)
    fail("load_npy", path, "not a .npy file (the magic string \\x93NUMPY is missing)");
  const unsigned major = bytes[6], minor = bytes[7];
  if (major < 1 || major > 3)
    fail("load_npy", path, "unsupported format version " + std::to_string(major) + "." + std::to_string(minor));
  const std::size_t len_size = major == 1 ? 2 : 4;
  const std::size_t prelude = kMagicSize + 2 + len_size;
  if (bytes.size() < prelude) fail("load_npy", path, "truncated file (the header length is missing)");
  const std::size_t header_len = little_uint(bytes.data() + kMagicSize + 2, len_size);
  if (bytes.size() < prelude + header_len)
    fail("load_npy", path,
         "truncated file (the header needs " + std::to_string(header_len) + " bytes, the file has " +
             std::to_string(bytes.size() - prelude) + ")");
  const std::string text(reinterpret_cast<const char*>(bytes.data() + prelude), header_len);
  const Header header = HeaderParser(text, path).parse();
  const Dtype dtype = parse_dtype(header.descr, path);

  std::size_t n = 1;
  for (std::size_t d : header.shape) {
    if (d != 0 && n > std::numeric_limits<std::size_t>::max() / d / dtype.size)
      fail("load_npy", path, "the shape " + to_string(header.shape) + " is too large");
    n *= d;
  }
  const std::size_t available = bytes.size() - prelude - header_len;
  if (available < n * dtype.size)
    fail("load_npy", path,
         "truncated data: shape " + to_string(header.shape) + " of '" + header.descr + "' needs " +
             std::to_string(n * dtype.size) + " bytes, the file has " + std::to_string(available));

  double* out = make(header.shape);
  const unsigned char* src = bytes.data() + prelude + header_len;
  const Reader read = reader_for(dtype);
  if (!header.fortran_order || header.shape.size() < 2) {
    for (std::size_t i = 0; i < n; ++i) out[i] = read(src + i * dtype.size, dtype.swap);
    return;
  }
  // Fortran order: the source runs with the first index fastest; walk it in
  // that order and place each value at its row-major offset.
  const Shape& shape = header.shape;
  const std::size_t nd = shape.size();
  Shape row_stride(nd, 1), index(nd, 0);
  for (std::size_t d = nd - 1; d-- > 0;) row_stride[d] = row_stride[d + 1] * shape[d + 1];
  std::size_t dst = 0;
  for (std::size_t i = 0; i < n; ++i) {
    out[dst] = read(src + i * dtype.size, dtype.swap);
    for (std::size_t d = 0; d < nd; ++d) {
      dst += row_stride[d];
      if (++index[d] < shape[d]) break;
      dst -= row_stride[d] * shape[d];
      index[d] = 0;
    }
  }
}

// Writes values in C order as float64 in the host's byte order.
void save_values(const std::string& path, const Shape& shape, const double* values) {
  std::ostringstream dict;
  dict << "{'descr': '" << (host_is_little_endian() ? '<' : '>') << "f8', 'fortran_order': False, 'shape': (";
  for (std::size_t d = 0; d < shape.size(); ++d) dict << (d ? ", " : "") << shape[d];
  dict << (shape.size() == 1 ? ",), }" : "), }");
  const std::string dict_text = dict.str();
  // pad with spaces and a final '\n' so the data starts on a 64-byte boundary;
  // version 2.0 (4-byte length) only when the header outgrows 65535 bytes
  auto padded = [&](std::size_t len_size) {
    const std::size_t unpadded = kMagicSize + 2 + len_size + dict_text.size() + 1;
    return dict_text + std::string((kAlign - unpadded % kAlign) % kAlign, ' ') + "\n";
  };
  std::size_t len_size = 2;
  std::string header = padded(len_size);
  if (header.size() > 0xffff) header = padded(len_size = 4);

  errno = 0;
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) fail("save_npy", path, std::string("cannot open the file for writing: ") + std::strerror(errno));
  out.write(kMagic, kMagicSize);
  const char version[2] = {char(len_size == 2 ? 1 : 2), 0};
  out.write(version, 2);
  const std::size_t hl = header.size();
  for (std::size_t i = 0; i < len_size; ++i) out.put(char((hl >> (8 * i)) & 0xff));
  out.write(header.data(), std::streamsize(header.size()));
  if (numel_of(shape) > 0)
    out.write(reinterpret_cast<const char*>(values), std::streamsize(numel_of(shape) * sizeof(double)));
  out.close();
  if (!out) fail("save_npy", path, "writing failed (disk full?)");
}

}  // namespace

void save_npy(const std::string& path, const Tensor& t) {
  if (!t.defined()) throw ValueError(detail::message("save_npy", "the tensor for '", path, "' is undefined"));
  save_values(path, t.shape(), t.data());
}

void save_npy(const std::string& path, const xt::xarray<double>& a) {
  save_values(path, Shape(a.shape().begin(), a.shape().end()), a.data());  // xarray<double> is row-major
}

Tensor load_npy(const std::string& path) {
  Tensor out;
  load_into(path, [&out](const Shape& shape) {
    out = Tensor::empty(shape);
    return out.mutable_data();
  });
  return out;
}

xt::xarray<double> load_npy_array(const std::string& path) {
  xt::xarray<double> out;
  load_into(path, [&out](const Shape& shape) {
    out = xt::xarray<double>::from_shape(shape);
    return out.data();
  });
  return out;
}

}  // namespace hesse
