#include "io/crc32.h"

#include <algorithm>
#include <array>

#include "core/parallel.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace pyckpt {
namespace {

constexpr uint32_t kPolynomial = 0xEDB88320u;  // reflected 0x04C11DB7

struct Tables {
  std::array<std::array<uint32_t, 256>, 16> t{};
  Tables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ kPolynomial : c >> 1;
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i) {
      for (size_t s = 1; s < 16; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFF];
    }
  }
};

const Tables& tables() {
  static const Tables instance;
  return instance;
}

uint32_t load32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) |
         (static_cast<uint32_t>(p[2]) << 16) | (static_cast<uint32_t>(p[3]) << 24);
}

// GF(2) 32x32 matrix helpers for crc32_combine (as in zlib's classic algorithm).
uint32_t gf2_times(const uint32_t* matrix, uint32_t vector) {
  uint32_t sum = 0;
  for (int i = 0; vector; ++i, vector >>= 1) {
    if (vector & 1) sum ^= matrix[i];
  }
  return sum;
}

void gf2_square(uint32_t* square, const uint32_t* matrix) {
  for (int i = 0; i < 32; ++i) square[i] = gf2_times(matrix, matrix[i]);
}

uint32_t crc32_table(uint32_t crc, const uint8_t* data, size_t length);

#if defined(__x86_64__)
#define PYCKPT_CLMUL __attribute__((target("pclmul,sse4.1")))

PYCKPT_CLMUL inline __m128i load128(const uint8_t* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}

// One folding step: carry lane's two halves forward by the distance the constants encode.
PYCKPT_CLMUL inline __m128i fold(__m128i lane, __m128i constants, __m128i next) {
  const __m128i low = _mm_clmulepi64_si128(lane, constants, 0x00);
  const __m128i high = _mm_clmulepi64_si128(lane, constants, 0x11);
  return _mm_xor_si128(_mm_xor_si128(low, high), next);
}

// Carry-less multiplication folding (Gopal et al., "Fast CRC Computation for Generic
// Polynomials Using PCLMULQDQ Instruction", Intel 2009), in the bit-reflected domain.
// Four 128-bit lanes are folded 64 bytes at a time, then into one lane, then reduced
// to 32 bits with Barrett reduction. `length` must be a multiple of 16 and >= 64;
// `state` is the raw (not inverted) CRC register.
PYCKPT_CLMUL uint32_t fold_pclmul(uint32_t state, const uint8_t* data, size_t length) {
  // x^(4*128+32) mod P, x^(4*128-32) mod P: fold distance of 64 bytes.
  const __m128i fold_64 = _mm_set_epi64x(0x01c6e41596, 0x0154442bd4);
  // x^(128+32) mod P, x^(128-32) mod P: fold distance of 16 bytes.
  const __m128i fold_16 = _mm_set_epi64x(0x00ccaa009e, 0x01751997d0);
  const __m128i fold_to_64 = _mm_set_epi64x(0, 0x0163cd6124);  // x^64 mod P
  const __m128i barrett = _mm_set_epi64x(0x01f7011641, 0x01db710641);  // mu, P
  const __m128i low32 = _mm_setr_epi32(~0, 0, ~0, 0);

  __m128i lane0 = _mm_xor_si128(load128(data), _mm_cvtsi32_si128(static_cast<int>(state)));
  __m128i lane1 = load128(data + 16), lane2 = load128(data + 32), lane3 = load128(data + 48);
  data += 64;
  length -= 64;
  for (; length >= 64; data += 64, length -= 64) {
    lane0 = fold(lane0, fold_64, load128(data));
    lane1 = fold(lane1, fold_64, load128(data + 16));
    lane2 = fold(lane2, fold_64, load128(data + 32));
    lane3 = fold(lane3, fold_64, load128(data + 48));
  }
  __m128i acc = fold(lane0, fold_16, lane1);
  acc = fold(acc, fold_16, lane2);
  acc = fold(acc, fold_16, lane3);
  for (; length >= 16; data += 16, length -= 16) acc = fold(acc, fold_16, load128(data));

  // 128 -> 64 bits.
  __m128i t = _mm_clmulepi64_si128(acc, fold_16, 0x10);
  acc = _mm_xor_si128(_mm_srli_si128(acc, 8), t);
  t = _mm_srli_si128(acc, 4);
  acc = _mm_clmulepi64_si128(_mm_and_si128(acc, low32), fold_to_64, 0x00);
  acc = _mm_xor_si128(acc, t);
  // Barrett reduction to 32 bits.
  t = _mm_clmulepi64_si128(_mm_and_si128(acc, low32), barrett, 0x10);
  t = _mm_clmulepi64_si128(_mm_and_si128(t, low32), barrett, 0x00);
  return static_cast<uint32_t>(_mm_extract_epi32(_mm_xor_si128(acc, t), 1));
}

bool have_pclmul() {
  static const bool supported = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
  return supported;
}
#endif

}  // namespace

uint32_t crc32_update(uint32_t crc, const uint8_t* data, size_t length) {
#if defined(__x86_64__)
  if (length >= 64 && have_pclmul()) {
    const size_t folded = length & ~size_t{15};
    crc = ~fold_pclmul(~crc, data, folded);
    data += folded;
    length -= folded;
  }
#endif
  return crc32_table(crc, data, length);
}

namespace {

uint32_t crc32_table(uint32_t crc, const uint8_t* data, size_t length) {
  const auto& t = tables().t;
  uint32_t c = ~crc;
  while (length >= 16) {
    const uint32_t a = load32(data) ^ c;
    const uint32_t b = load32(data + 4);
    const uint32_t d = load32(data + 8);
    const uint32_t e = load32(data + 12);
    c = t[15][a & 0xFF] ^ t[14][(a >> 8) & 0xFF] ^ t[13][(a >> 16) & 0xFF] ^ t[12][a >> 24] ^
        t[11][b & 0xFF] ^ t[10][(b >> 8) & 0xFF] ^ t[9][(b >> 16) & 0xFF] ^ t[8][b >> 24] ^
        t[7][d & 0xFF] ^ t[6][(d >> 8) & 0xFF] ^ t[5][(d >> 16) & 0xFF] ^ t[4][d >> 24] ^
        t[3][e & 0xFF] ^ t[2][(e >> 8) & 0xFF] ^ t[1][(e >> 16) & 0xFF] ^ t[0][e >> 24];
    data += 16;
    length -= 16;
  }
  while (length--) c = (c >> 8) ^ t[0][(c ^ *data++) & 0xFF];
  return ~c;
}

}  // namespace

uint32_t crc32_combine(uint32_t crc_a, uint32_t crc_b, uint64_t length_b) {
  if (length_b == 0) return crc_a;
  uint32_t even[32], odd[32];
  odd[0] = kPolynomial;  // operator for one zero bit
  for (int i = 1; i < 32; ++i) odd[i] = 1u << (i - 1);
  gf2_square(even, odd);  // two zero bits
  gf2_square(odd, even);  // four zero bits
  do {
    gf2_square(even, odd);
    if (length_b & 1) crc_a = gf2_times(even, crc_a);
    length_b >>= 1;
    if (!length_b) break;
    gf2_square(odd, even);
    if (length_b & 1) crc_a = gf2_times(odd, crc_a);
    length_b >>= 1;
  } while (length_b);
  return crc_a ^ crc_b;
}

std::vector<uint32_t> parallel_crc32(const ByteSource& source, const std::vector<CrcRange>& ranges,
                                     int threads, uint64_t chunk_bytes) {
  struct Piece {
    size_t range;
    uint64_t offset, length;
    uint32_t crc;
  };
  std::vector<Piece> pieces;
  for (size_t r = 0; r < ranges.size(); ++r) {
    source.check_range(ranges[r].offset, ranges[r].length, "read");
    uint64_t done = 0;
    do {
      const uint64_t length = std::min(chunk_bytes, ranges[r].length - done);
      pieces.push_back({r, ranges[r].offset + done, length, 0});
      done += length;
    } while (done < ranges[r].length);
  }
  const size_t buffer_bytes = static_cast<size_t>(std::min<uint64_t>(chunk_bytes, 1 << 20));
  parallel_for<std::vector<uint8_t>>(pieces.size(), threads, [&](size_t i, std::vector<uint8_t>& buffer) {
    if (buffer.empty()) buffer.resize(buffer_bytes);
    uint32_t crc = 0;
    for (uint64_t done = 0; done < pieces[i].length; done += buffer.size()) {
      const uint64_t length = std::min<uint64_t>(buffer.size(), pieces[i].length - done);
      source.read_into(pieces[i].offset + done, length, buffer.data());
      crc = crc32_update(crc, buffer.data(), static_cast<size_t>(length));
    }
    pieces[i].crc = crc;
  });

  std::vector<uint32_t> result(ranges.size(), 0);
  std::vector<bool> started(ranges.size(), false);
  for (const Piece& piece : pieces) {
    result[piece.range] = started[piece.range]
                              ? crc32_combine(result[piece.range], piece.crc, piece.length)
                              : piece.crc;
    started[piece.range] = true;
  }
  return result;
}

}  // namespace pyckpt
