// Intel AMX (Sapphire Rapids and later): the tile configuration every AMX kernel here uses, and the
// one-time request Linux needs before a process may touch tile data.
#pragma once
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)  // the kernels also need AVX-512
#define ORCA_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <cstdint>

namespace amx {

// Every tile 16 rows of 64 bytes: A as 16 x 32 bf16, B as 16 x 16 bf16 pairs (VNNI), C as 16 x 16 float.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int t = 0; t < 8; ++t) bytes_per_row[t] = 64, rows[t] = 16;
  }
};

// Whether this process may use the tiles: Linux grants AMX's large register state only on request
// (arch_prctl ARCH_REQ_XCOMP_PERM); oneDNN asks too, but a kernel must not rely on having run after it.
inline bool available() {
  static const bool granted = [] {
    constexpr int kRequestPermission = 0x1023, kTileData = 18;
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return granted;
}

// Loads the configuration on the calling thread (oneDNN's kernels load their own, so every task does)
// and releases the tiles when the scope ends.
struct Scope {
  Scope() {
    static const TileConfig config;
    _tile_loadconfig(&config);
  }
  ~Scope() { _tile_release(); }
};

}  // namespace amx
#endif
