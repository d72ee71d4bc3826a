/* owlnet's compiled CPU kernels: the loops NumPy cannot run in one pass over memory.
 *
 * Built with the package (pyproject.toml's ext-modules) and called through ctypes by
 * native.py, which releases the GIL for the call: the worker threads of kernels/threads.py
 * each run a band of planes or positions at once, or (the direct convolution) one call runs
 * its pieces on this file's own workers (pieces_run). Every function exists for float ("_f32")
 * and double ("_f64"), written once as a macro over the element type T (the Winograd
 * convolution for float only); the vectorised ones are built for AVX2 with FMA and for the
 * baseline, one bound at load time. A function writes only its own band of the output, and
 * sums run in a fixed order, so results do not depend on how work is cut among threads.
 * Sections: pooling, direct convolution, Winograd convolution, col2im, depthwise convolution,
 * products with few rows, per-channel passes (BatchNorm, Scale, channel sums, ReLU's
 * gradient), LRN, SGD.
 *
 * Pooling follows Caffe's windows: output (py, px) of a plane covers rows py*sh - ph ..
 * + kh and columns px*sw - pw .. + kw. MAX reads the part inside the image, keeps the first
 * maximum in row-major order (strictly larger replaces) and its plane index y*w + x; AVE
 * divides the in-image sum by the area of the window clipped to the padded image
 * (min(start + k, size + pad) - start per side). Backward passes scatter each output's
 * gradient in output order, adding in T, as Caffe's CPU layer does.
 */
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>

typedef int64_t i64;
typedef int32_t i32;

/* 32-byte vectors of T (unaligned: VU) and of ints the width of T. */
typedef float vf32 __attribute__((vector_size(32)));
typedef double vf64 __attribute__((vector_size(32)));
typedef float vf32u __attribute__((vector_size(32), aligned(4)));
typedef double vf64u __attribute__((vector_size(32), aligned(8)));
typedef int32_t vi32 __attribute__((vector_size(32)));
typedef int64_t vi64 __attribute__((vector_size(32)));
/* 64-byte vectors, for the direct convolution's AVX-512 build. */
typedef float vw32 __attribute__((vector_size(64)));
typedef double vw64 __attribute__((vector_size(64)));
typedef float vw32u __attribute__((vector_size(64), aligned(4)));
typedef double vw64u __attribute__((vector_size(64), aligned(8)));
typedef int32_t vwi32 __attribute__((vector_size(64)));

/* The vectorised kernels are built twice, as name_fast (AVX2 with FMA) and name_baseline;
 * native.py binds the first where has_avx2_fma() says the CPU has them. The direct and
 * Winograd convolutions are also built for AVX-512 (its 32 registers hold bigger tiles), as
 * name_wide (64-byte vectors) and name_wide_half (32-byte vectors: rows of at most half a
 * wide vector, channel counts that 64-byte vectors would pad badly), which native.py binds
 * where has_avx512() says the CPU has it. Elsewhere than on x86 all are the same baseline
 * build. */
#define BASELINE
#if defined(__x86_64__) || defined(__i386__)
#define FAST __attribute__((target("avx2,fma")))
#define WIDE __attribute__((target("avx2,fma,avx512f,avx512vl")))
int has_avx2_fma(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
int has_avx512(void)
{
    __builtin_cpu_init();
    return has_avx2_fma() && __builtin_cpu_supports("avx512f")
        && __builtin_cpu_supports("avx512vl");
}
#else
#define FAST
#define WIDE
int has_avx2_fma(void)
{
    return 0;
}
int has_avx512(void)
{
    return 0;
}
#endif

/* -- the compiled pieces' own threads ------------------------------------------------------------
 * pieces_run(fn, job, count, threads) calls fn(job, i) for i = 0..count-1 on the calling thread
 * and up to threads - 1 workers, each taking the next index from a shared counter, and returns
 * when all are done. Python's hand-off to a waiting thread (a lock, then the GIL) costs tens of
 * microseconds, as much as a small convolution's half; these workers instead spin on a
 * generation counter for a while after each job (SPINS pauses, about a millisecond: through
 * the Python between two convolutions), then sleep on a condition variable until the next,
 * or at once after pieces_park(). One job runs at a time: a call made
 * while another runs (another thread, or from inside a piece) runs its pieces in turn. A
 * forked child starts with no workers and makes its own. */
enum { POOL_MAX = 64, SPINS = 1 << 15 };
typedef void (*piece_fn)(void *job, int index);

static struct {
    pthread_mutex_t lock, run;
    pthread_cond_t wake;
    int started, sleepers, registered;
    atomic_int parked;
    atomic_uint generation;
    atomic_int next, active, wanted;
    piece_fn fn;
    void *job;
    int count;
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .run = PTHREAD_MUTEX_INITIALIZER,
          .wake = PTHREAD_COND_INITIALIZER};

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void pool_take_pieces(void)
{
    for (int i; (i = atomic_fetch_add(&pool.next, 1)) < pool.count;) pool.fn(pool.job, i);
}

/* The generation each worker was started in (before the job that started it was posted). */
static unsigned pool_born[POOL_MAX];

static void *pool_worker(void *arg)
{
    const int id = (int)(intptr_t)arg;
    unsigned seen = pool_born[id];
    for (;;) {
        unsigned now;
        int spins = 0;
        while ((now = atomic_load_explicit(&pool.generation, memory_order_acquire)) == seen) {
            if (++spins < SPINS && !atomic_load_explicit(&pool.parked, memory_order_relaxed)) {
                cpu_relax();
                continue;
            }
            pthread_mutex_lock(&pool.lock);
            pool.sleepers++;
            while (atomic_load(&pool.generation) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
            pool.sleepers--;
            pthread_mutex_unlock(&pool.lock);
        }
        /* Who takes part is read for the job just seen: if a newer one was posted meanwhile
         * (this worker took no part in the last, so it did not wait for it), look again. */
        const int wanted = atomic_load_explicit(&pool.wanted, memory_order_relaxed);
        if (atomic_load_explicit(&pool.generation, memory_order_acquire) != now) continue;
        seen = now;
        if (id < wanted) {
            pool_take_pieces();
            atomic_fetch_sub_explicit(&pool.active, 1, memory_order_release);
        }
    }
    return NULL;
}

static void pool_forget_in_child(void)
{
    pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t fresh_cond = PTHREAD_COND_INITIALIZER;
    pool.lock = fresh;
    pool.run = fresh;
    pool.wake = fresh_cond;
    pool.started = pool.sleepers = 0;
}

/* Called with pool.run held: workers 0..n-1 exist (as many as could be started). */
static void pool_start(int n)
{
    if (!pool.registered) {
        pthread_atfork(NULL, NULL, pool_forget_in_child);
        pool.registered = 1;
    }
    while (pool.started < n) {
        pthread_t thread;
        pool_born[pool.started] = atomic_load(&pool.generation);
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int failed = pthread_create(&thread, &attr, pool_worker,
                                          (void *)(intptr_t)pool.started);
        pthread_attr_destroy(&attr);
        if (failed) break;
        pool.started++;
    }
}

static void pieces_run(piece_fn fn, void *job, int count, int threads)
{
    if (threads > POOL_MAX) threads = POOL_MAX;
    if (threads < 2 || count < 2 || pthread_mutex_trylock(&pool.run) != 0) {
        for (int i = 0; i < count; ++i) fn(job, i);
        return;
    }
    pool_start(threads - 1);
    pool.fn = fn;
    pool.job = job;
    pool.count = count;
    const int wanted = threads - 1 < pool.started ? threads - 1 : pool.started;
    atomic_store(&pool.wanted, wanted);
    atomic_store(&pool.next, 0);
    atomic_store(&pool.active, wanted);
    atomic_store(&pool.parked, 0);
    atomic_fetch_add_explicit(&pool.generation, 1, memory_order_release);
    pthread_mutex_lock(&pool.lock);
    if (pool.sleepers) pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    pool_take_pieces();
    for (int spins = 0; atomic_load_explicit(&pool.active, memory_order_acquire) > 0;)
        if (++spins < SPINS) cpu_relax(); else sched_yield();
    pthread_mutex_unlock(&pool.run);
}

/* Spinning workers go to sleep now (until the next job): kernels/threads.py calls this before
 * its own worker threads run pieces, which need the cores. */
void pieces_park(void)
{
    atomic_store_explicit(&pool.parked, 1, memory_order_relaxed);
}

#define POOL_GEOMETRY int h, int w, int oh, int ow, int kh, int kw, int sh, int sw, int ph, \
    int pw

/* -- pooling forward, separable ----------------------------------------------------------------
 * A window is combined along its row first, then down its column: per plane, every image row
 * yy gets the combination over the kernel columns of each output column px (hval, and for an
 * argmax the column of the row's first maximum, hcol), then each output combines the rows of
 * its window in order. MAX: strictly larger replaces, so the first maximum of the first row
 * holding the window's maximum is the first in row-major order; AVE adds row sums, then
 * divides by Caffe's area (the window clipped to the padded image). Each output combines its
 * values in registers, the loops running along rows of outputs (vectors where the kernel is
 * 2 or 3 wide and the stride 1 or 2): a row combined in place one kernel column at a time
 * reloads what it has just stored, which stalls on short rows. */
/* best (and its index at) combined with value (at index): MAX keeps best unless value is
 * strictly larger; AVE adds. */
#define POOL_COMBINE(best, at, value, index)                                                  \
    if (is_max) {                                                                             \
        const int larger = (value) > best;                                                    \
        best = larger ? (value) : best;                                                       \
        at = larger ? (index) : at;                                                           \
    } else {                                                                                  \
        best += (value);                                                                      \
    }
/* Interior output columns lo..hi-1 of image row `row` (their windows inside it), column
 * stride STEP, kernel width KW (each a constant where it can be: the loops become vectors). */
#define POOL_ROW_INTERIOR(T, STEP, KW)                                                        \
    for (int px = lo; px < hi; ++px) {                                                        \
        const int x0 = px * (STEP) - pw;                                                      \
        T best = row[x0];                                                                     \
        i32 at = x0;                                                                          \
        for (int j = 1; j < (KW); ++j) {                                                      \
            POOL_COMBINE(best, at, row[x0 + j], x0 + j)                                       \
        }                                                                                     \
        out[px] = best;                                                                       \
        if (col) col[px] = at;                                                                \
    }
#define POOL_ROW_STEP(T, STEP)                                                                \
    if (kw == 2) {                                                                            \
        POOL_ROW_INTERIOR(T, STEP, 2)                                                         \
    } else if (kw == 3) {                                                                     \
        POOL_ROW_INTERIOR(T, STEP, 3)                                                         \
    } else {                                                                                  \
        POOL_ROW_INTERIOR(T, STEP, kw)                                                        \
    }
/* Output row `out` (argmax row `at_out`) from the `ROWS` rows of hval from h0 (and of hcol
 * from c0), the window's first row y0. */
#define POOL_COLUMNS(T, ROWS)                                                                 \
    for (int px = 0; px < ow; ++px) {                                                         \
        T best = h0[px];                                                                      \
        i32 at = c0 ? y0 * w + c0[px] : 0;                                                    \
        for (int r = 1; r < (ROWS); ++r) {                                                    \
            POOL_COMBINE(best, at, h0[(i64)r * ow + px], c0 ? (y0 + r) * w + c0[(i64)r * ow + px] : 0) \
        }                                                                                     \
        out[px] = best;                                                                       \
        if (at_out) at_out[px] = at;                                                          \
    }

#define DEFINE_POOL_FORWARD(T, S, ISA, TARGET)                                                \
/* hval (and hcol, when not null) for every row of one image; output columns lo..hi-1 (the   \
 * interior) have their window inside the row. */                                            \
static TARGET void pool_rows_##S##_##ISA(const T *image, T *hval, i32 *hcol, int is_max,      \
                                          int lo, int hi, int h, int w, int ow, int kw,       \
                                          int sw, int pw)                                     \
{                                                                                             \
    for (int yy = 0; yy < h; ++yy) {                                                          \
        const T *row = image + (i64)yy * w;                                                   \
        T *out = hval + (i64)yy * ow;                                                         \
        i32 *col = hcol ? hcol + (i64)yy * ow : 0;                                            \
        for (int px = 0; px < ow; ++px) {                                                     \
            if (px == lo && lo < hi) px = hi;        /* the interior is done below */          \
            if (px >= ow) break;                                                              \
            int x0 = px * sw - pw, x1 = x0 + kw < w ? x0 + kw : w;                            \
            x0 = x0 > 0 ? x0 : 0;                                                             \
            T best = row[x0];                                                                 \
            i32 at = x0;                                                                      \
            for (int xx = x0 + 1; xx < x1; ++xx) {                                            \
                POOL_COMBINE(best, at, row[xx], xx)                                           \
            }                                                                                 \
            out[px] = best;                                                                   \
            if (col) col[px] = at;                                                            \
        }                                                                                     \
        if (sw == 1) {                                                                        \
            POOL_ROW_STEP(T, 1)                                                               \
        } else if (sw == 2) {                                                                 \
            POOL_ROW_STEP(T, 2)                                                               \
        } else {                                                                              \
            POOL_ROW_INTERIOR(T, sw, kw)                                                      \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* MAX (is_max): each window's largest in-image value and (argmax not null) its plane index;  \
 * AVE: its in-image sum over its area clipped to the padded image. Scratch: hval (h * ow     \
 * values) and, for an argmax, hcol (h * ow). */                                              \
static TARGET void pool_forward_##S##_##ISA(const T *x, T *y, i32 *argmax, T *hval,          \
                                            i32 *hcol, int is_max, i64 planes, POOL_GEOMETRY) \
{                                                                                             \
    int lo = (pw + sw - 1) / sw, hi = w - kw + pw < 0 ? 0 : (w - kw + pw) / sw + 1;          \
    hi = hi < ow ? hi : ow;                                                                   \
    lo = lo < hi ? lo : hi;                                                                   \
    if (!argmax) hcol = 0;                                                                    \
    for (i64 p = 0; p < planes; ++p) {                                                        \
        pool_rows_##S##_##ISA(x + p * h * w, hval, hcol, is_max, lo, hi, h, w, ow, kw, sw, pw); \
        for (int py = 0; py < oh; ++py) {                                                     \
            int y0 = py * sh - ph, y1 = y0 + kh < h ? y0 + kh : h;                            \
            const int padded_end = y0 + kh < h + ph ? y0 + kh : h + ph;                       \
            const int rows = padded_end - y0;                                                 \
            y0 = y0 > 0 ? y0 : 0;                                                             \
            T *out = y + (p * oh + py) * ow;                                                  \
            i32 *at_out = argmax ? argmax + (p * oh + py) * ow : 0;                           \
            const T *h0 = hval + (i64)y0 * ow;                                                \
            const i32 *c0 = hcol ? hcol + (i64)y0 * ow : 0;                                   \
            if (y1 - y0 == 2) {                                                               \
                POOL_COLUMNS(T, 2)                                                            \
            } else if (y1 - y0 == 3) {                                                        \
                POOL_COLUMNS(T, 3)                                                            \
            } else {                                                                          \
                POOL_COLUMNS(T, y1 - y0)                                                      \
            }                                                                                 \
            if (!is_max)                                                                      \
                for (int px = 0; px < ow; ++px) {                                             \
                    const int x0 = px * sw - pw;                                              \
                    const int x1 = x0 + kw < w + pw ? x0 + kw : w + pw;                       \
                    out[px] /= (T)(rows * (x1 - x0));                                         \
                }                                                                             \
        }                                                                                     \
    }                                                                                         \
}

DEFINE_POOL_FORWARD(float, f32, fast, FAST)
DEFINE_POOL_FORWARD(float, f32, baseline, BASELINE)
DEFINE_POOL_FORWARD(double, f64, fast, FAST)
DEFINE_POOL_FORWARD(double, f64, baseline, BASELINE)

/* -- pooling backward: each output's gradient scattered, in output order ------------------- */
#define DEFINE_POOL_BACKWARD(T, S)                                                                  \
static void max_pool_backward_##S(const T *dy, const i32 *argmax, T *dx, i64 planes,           \
                                  POOL_GEOMETRY)                                              \
{                                                                                             \
    (void)kh; (void)kw; (void)sh; (void)sw; (void)ph; (void)pw;                               \
    memset(dx, 0, sizeof(T) * planes * h * w);                                                \
    for (i64 p = 0; p < planes; ++p) {                                                        \
        T *image = dx + p * h * w;                                                            \
        const i64 first = p * oh * ow;                                                        \
        for (i64 o = 0; o < (i64)oh * ow; ++o) image[argmax[first + o]] += dy[first + o];     \
    }                                                                                         \
}                                                                                             \
                                                                                              \
static void ave_pool_backward_##S(const T *dy, T *dx, i64 planes, POOL_GEOMETRY)              \
{                                                                                             \
    memset(dx, 0, sizeof(T) * planes * h * w);                                                \
    for (i64 p = 0; p < planes; ++p) {                                                        \
        T *image = dx + p * h * w;                                                            \
        for (int py = 0; py < oh; ++py) {                                                     \
            int y0 = py * sh - ph, y1 = y0 + kh < h + ph ? y0 + kh : h + ph;                  \
            const int rows = y1 - y0;                                                         \
            y0 = y0 > 0 ? y0 : 0;                                                             \
            y1 = y1 < h ? y1 : h;                                                             \
            for (int px = 0; px < ow; ++px) {                                                 \
                int x0 = px * sw - pw, x1 = x0 + kw < w + pw ? x0 + kw : w + pw;              \
                const int area = rows * (x1 - x0);                                            \
                x0 = x0 > 0 ? x0 : 0;                                                         \
                x1 = x1 < w ? x1 : w;                                                         \
                const T share = dy[(p * oh + py) * ow + px] / (T)area;                        \
                for (int yy = y0; yy < y1; ++yy)                                              \
                    for (int xx = x0; xx < x1; ++xx) image[yy * w + xx] += share;             \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
}

DEFINE_POOL_BACKWARD(float, f32)
DEFINE_POOL_BACKWARD(double, f64)

/* Pooling over `bands` bands of planes (band b: planes * b / bands on), run on the pool's
 * threads: kind POOL_FORWARD (in: x; out: y, argmax or null; each band its own scratch,
 * hval and hcol of h * ow values each at b * h * ow), POOL_MAX_BACKWARD (in: dy, argmax;
 * out: dx) or POOL_AVE_BACKWARD (in: dy; out: dx). A plane's result does not depend on its
 * band. */
enum { POOL_FORWARD, POOL_MAX_BACKWARD, POOL_AVE_BACKWARD };

#define DEFINE_POOL_BANDS(T, S, ISA, TARGET)                                                  \
struct pool_job_##S##_##ISA {                                                                 \
    int kind, is_max, bands;                                                                  \
    const void *in0, *in1;                                                                    \
    void *out0, *out1;                                                                        \
    T *hval;                                                                                  \
    i32 *hcol;                                                                                \
    i64 planes;                                                                               \
    int g[10];                                                                                \
};                                                                                            \
                                                                                              \
static void pool_band_##S##_##ISA(void *job, int band)                                        \
{                                                                                             \
    const struct pool_job_##S##_##ISA *j = job;                                               \
    const int *g = j->g;                                                                      \
    const i64 p0 = j->planes * band / j->bands, p1 = j->planes * (band + 1) / j->bands;       \
    const i64 in_plane = (i64)g[0] * g[1], out_plane = (i64)g[2] * g[3];                      \
    const i64 scratch = (i64)g[0] * g[3] * band;                                              \
    switch (j->kind) {                                                                        \
    case POOL_FORWARD:                                                                        \
        pool_forward_##S##_##ISA((const T *)j->in0 + p0 * in_plane,                           \
                                 (T *)j->out0 + p0 * out_plane,                               \
                                 j->out1 ? (i32 *)j->out1 + p0 * out_plane : 0,               \
                                 j->hval + scratch, j->hcol ? j->hcol + scratch : 0,          \
                                 j->is_max, p1 - p0, g[0], g[1], g[2], g[3], g[4], g[5],      \
                                 g[6], g[7], g[8], g[9]);                                     \
        break;                                                                                \
    case POOL_MAX_BACKWARD:                                                                   \
        max_pool_backward_##S((const T *)j->in0 + p0 * out_plane,                             \
                              (const i32 *)j->in1 + p0 * out_plane,                           \
                              (T *)j->out0 + p0 * in_plane, p1 - p0, g[0], g[1], g[2], g[3],  \
                              g[4], g[5], g[6], g[7], g[8], g[9]);                            \
        break;                                                                                \
    case POOL_AVE_BACKWARD:                                                                   \
        ave_pool_backward_##S((const T *)j->in0 + p0 * out_plane,                             \
                              (T *)j->out0 + p0 * in_plane, p1 - p0, g[0], g[1], g[2], g[3],  \
                              g[4], g[5], g[6], g[7], g[8], g[9]);                            \
        break;                                                                                \
    }                                                                                         \
}                                                                                             \
                                                                                              \
TARGET void pool_bands_##S##_##ISA(int kind, const void *in0, const void *in1, void *out0,    \
                                   void *out1, T *hval, i32 *hcol, int is_max, i64 planes,    \
                                   POOL_GEOMETRY, int bands, int threads)                     \
{                                                                                             \
    struct pool_job_##S##_##ISA job = {kind, is_max, bands, in0, in1, out0, out1, hval, hcol, \
                                       planes, {h, w, oh, ow, kh, kw, sh, sw, ph, pw}};       \
    pieces_run(pool_band_##S##_##ISA, &job, bands, threads);                                  \
}

DEFINE_POOL_BANDS(float, f32, fast, FAST)
DEFINE_POOL_BANDS(float, f32, baseline, BASELINE)
DEFINE_POOL_BANDS(double, f64, fast, FAST)
DEFINE_POOL_BANDS(double, f64, baseline, BASELINE)

/* -- direct convolution (no column matrix) --------------------------------------------------
 * The images are first copied into a "frame": zero-padded and split into sw column phases,
 * (images, channels, sw, hf, q) with padded column u at phase u % sw, position u / sw, and at
 * least one tile of zero columns past the last (so tiles may read past a row's end). Window
 * entry k = (c, i, j) of output (oy, ox) then lies at frame offset koff[k] + oy*sh*q + ox,
 * koff[k] = ((c*sw + (j*dw) % sw)*hf + i*dh)*q + (j*dw) / sw: for a run of outputs along a row
 * the inputs are contiguous, so the kernels run vectors of L outputs (L = the vector's bytes /
 * sizeof(T)) along a row.
 *
 * Forward: a tile of MT output channels x PV vectors of outputs, summed over k in order into
 * registers (weights packed by conv_forward's caller as (tiles, K, MT), zero rows past M; MT
 * from conv_direct_tile). Backward-filter: a tile of MT2 output channels x KT window entries
 * (the tiles are macro arguments: 16 vector registers hold fewer than AVX-512's 32), each a
 * vector of partial
 * sums over the outputs (lane l gets the outputs with ox % L == l, in order of images, rows,
 * columns), whose lanes are then added in order: dw[m][k] is written, or added to.
 */
#define DEFINE_FRAME(T, S)                                                                    \
static void conv_frame_values_##S(const T *x, T *frame, i64 planes, int h, int w, int ph,     \
                                  int pw, int sw, int hf, int q)                              \
{                                                                                             \
    for (int phase = 0; phase < sw; ++phase) {                                                \
        /* image columns xx with (xx + pw) % sw == phase, at position (xx + pw) / sw (the     \
         * divisions once per phase: per row they cost more than the copy of a small plane) */ \
        const int first = ((phase - pw) % sw + sw) % sw;                                      \
        const int count = (w - first + sw - 1) / sw;                                          \
        const i64 to = ((i64)phase * hf + ph) * q + (first + pw) / sw;                        \
        for (i64 p = 0; p < planes; ++p) {                                                    \
            const T *in = x + p * h * w + first;                                              \
            T *out = frame + p * sw * hf * q + to;                                            \
            for (int yy = 0; yy < h; ++yy, in += w, out += q)                                 \
                if (sw == 1)                                                                  \
                    memcpy(out, in, sizeof(T) * w);                                           \
                else if (sw == 2)               /* a constant stride: vectorised */           \
                    for (int at = 0; at < count; ++at) out[at] = in[2 * at];                  \
                else                                                                          \
                    for (int at = 0; at < count; ++at) out[at] = in[(i64)at * sw];            \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
void conv_frame_##S(const T *x, T *frame, i64 planes, int h, int w, int ph, int pw, int sw,   \
                    int hf, int q)                                                            \
{                                                                                             \
    memset(frame, 0, sizeof(T) * planes * sw * hf * q);                                       \
    conv_frame_values_##S(x, frame, planes, h, w, ph, pw, sw, hf, q);                         \
}

/* max(value, 0) of a vector in place, lanes holding NaN kept (a compare makes them 0 else). */
#define VECTOR_RELU(value)                                                                    \
    {                                                                                         \
        const __typeof__((value) < (value)) negative = (value) < (__typeof__(value)){0};      \
        (value) = (__typeof__(value))((__typeof__(negative))(value) & ~negative);             \
    }

/* One forward tile: acc[MT][PV] over all k, then (times scale[m], plus shift[m], each where
 * not null, then max(., 0) with relu, NaN kept) stored (``valid`` outputs, ``mt`` rows). */
#define FORWARD_TILE(T, V, VU, MT, PV)                                                        \
    {                                                                                         \
        V acc[MT][PV];                                                                        \
        for (int a = 0; a < MT; ++a)                                                          \
            for (int b = 0; b < PV; ++b) acc[a][b] = (V){0};                                  \
        const T *base = image + (i64)oy * sh * q + ox;                                        \
        const T *wk = packed + (i64)(m0 / MT) * K * MT;                                       \
        for (int k = 0; k < K; ++k, wk += MT) {                                               \
            V xv[PV];                                                                         \
            for (int b = 0; b < PV; ++b) xv[b] = *(const VU *)(base + koff[k] + b * L);       \
            for (int a = 0; a < MT; ++a)                                                      \
                for (int b = 0; b < PV; ++b) acc[a][b] += xv[b] * wk[a];                      \
        }                                                                                     \
        const int valid = ow - ox < PV * L ? ow - ox : PV * L;                                \
        for (int a = 0; a < MT && m0 + a < m1; ++a) {                                         \
            T *out = y + img * y_image + ((i64)(m0 + a) * oh + oy) * ow + ox;                 \
            for (int b = 0; b < PV; ++b) {                                                    \
                if (scale) acc[a][b] *= scale[m0 + a];                                        \
                if (shift) acc[a][b] += shift[m0 + a];                                        \
                if (relu) VECTOR_RELU(acc[a][b])                                              \
            }                                                                                 \
            if (valid == PV * L) {                                                            \
                for (int b = 0; b < PV; ++b) *(VU *)(out + b * L) = acc[a][b];                \
            } else {                                                                          \
                T lanes[PV * L];                                                              \
                memcpy(lanes, acc[a], sizeof lanes);                                          \
                memcpy(out, lanes, sizeof(T) * valid);                                        \
            }                                                                                 \
        }                                                                                     \
    }

/* Tiles: forward MT_ROWS channels x 2 vectors where a row holds more than one vector, else
 * MT_ONE channels x 1 vector; backward-filter MT2 x KT. */
#define DEFINE_DIRECT(T, S, V, VU, ISA, TARGET, MT_ROWS, MT_ONE, MT2_, KT_)                    \
/* The forward's channel tile for output rows ow wide. */                                     \
int conv_direct_tile_##S##_##ISA(int ow)                                                      \
{                                                                                             \
    return ow > (int)(sizeof(V) / sizeof(T)) ? MT_ROWS : MT_ONE;                              \
}                                                                                             \
                                                                                              \
/* y[img][m][oy][ox] for images 0..images-1, channels m0..m1-1 (m0 a multiple of the tile),   \
 * rows r0..r1-1; scale and shift (m1 values, or null) and relu as FORWARD_TILE applies them. */ \
TARGET void conv_direct_forward_##S##_##ISA(                                                \
    const T *frame, i64 frame_image, const i64 *koff, int K, const T *packed, T *y,           \
    i64 y_image, i64 images, int m0_first, int m1, int oh, int ow, int r0, int r1, int sh,    \
    int q, const T *scale, const T *shift, int relu)                                          \
{                                                                                             \
    const int L = (int)(sizeof(V) / sizeof(T));                                               \
    const int tile = conv_direct_tile_##S##_##ISA(ow);                                        \
    for (int m0 = m0_first; m0 < m1; m0 += tile) {                                            \
        for (i64 img = 0; img < images; ++img) {                                              \
            const T *image = frame + img * frame_image;                                       \
            for (int oy = r0; oy < r1; ++oy) {                                                \
                if (ow > L) {                                                                 \
                    for (int ox = 0; ox < ow; ox += 2 * L) FORWARD_TILE(T, V, VU, MT_ROWS, 2) \
                } else {                                                                      \
                    const int ox = 0;                                                         \
                    FORWARD_TILE(T, V, VU, MT_ONE, 1)                                         \
                }                                                                             \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* dw[m][k] (= or +=) the sum over images, rows r0..r1-1 and columns of                      \
 * dy[img][m][oy][ox] * frame[img][koff[k] + oy*sh*q + ox], for channels 0..m-1. A row's   \
 * last partial vector of dy is completed with zeros; the frame values those lanes meet are  \
 * multiplied by zero (finite inputs assumed). */                                             \
TARGET void conv_direct_backward_filter_##S##_##ISA(                                        \
    const T *frame, i64 frame_image, const i64 *koff, int K, const T *dy, i64 dy_image,       \
    T *dw, int accumulate, i64 images, int m, int oh, int ow, int r0, int r1, int sh, int q)  \
{                                                                                             \
    enum { MT2 = MT2_, KT = KT_ };                                                            \
    const int L = (int)(sizeof(V) / sizeof(T));                                               \
    for (int k0 = 0; k0 < K; k0 += KT) {                                                      \
        i64 offsets[KT];                                                                      \
        for (int b = 0; b < KT; ++b) offsets[b] = koff[k0 + b < K ? k0 + b : K - 1];          \
        for (int m0 = 0; m0 < m; m0 += MT2) {                                                 \
            V acc[MT2][KT];                                                                   \
            for (int a = 0; a < MT2; ++a)                                                     \
                for (int b = 0; b < KT; ++b) acc[a][b] = (V){0};                              \
            const int m_last = m0 + MT2 <= m ? MT2 - 1 : m - 1 - m0;                          \
            for (i64 img = 0; img < images; ++img) {                                          \
                const T *image = frame + img * frame_image;                                   \
                for (int oy = r0; oy < r1; ++oy) {                                            \
                    const T *base = image + (i64)oy * sh * q;                                 \
                    const T *grads[MT2];                                                      \
                    for (int a = 0; a < MT2; ++a)                                             \
                        grads[a] = dy + img * dy_image                                        \
                            + ((i64)(m0 + (a < m_last ? a : m_last)) * oh + oy) * ow;         \
                    for (int ox = 0; ox < ow; ox += L) {                                      \
                        V gv[MT2];                                                            \
                        if (ox + L <= ow)                                                     \
                            for (int a = 0; a < MT2; ++a) gv[a] = *(const VU *)(grads[a] + ox); \
                        else                  /* the row's last part, completed with zeros */ \
                            for (int a = 0; a < MT2; ++a) {                                   \
                                gv[a] = (V){0};                                               \
                                for (int l = 0; l < ow - ox; ++l) gv[a][l] = grads[a][ox + l]; \
                            }                                                                 \
                        for (int b = 0; b < KT; ++b) {                                        \
                            const V xv = *(const VU *)(base + offsets[b] + ox);               \
                            for (int a = 0; a < MT2; ++a) acc[a][b] += gv[a] * xv;            \
                        }                                                                     \
                    }                                                                         \
                }                                                                             \
            }                                                                                 \
            for (int a = 0; a <= m_last; ++a)                                                 \
                for (int b = 0; b < KT && k0 + b < K; ++b) {                                  \
                    T total = 0;                                                              \
                    for (int l = 0; l < L; ++l) total += acc[a][b][l];                        \
                    T *out = dw + (i64)(m0 + a) * K + k0 + b;                                 \
                    *out = accumulate ? *out + total : total;                                 \
                }                                                                             \
        }                                                                                     \
    }                                                                                         \
}

/* The whole forward of a direct convolution in one call, on pieces_run's threads: the images
 * framed (planes in `bands` equal runs) and the weights (group, mg, K) packed as (group,
 * tiles, K, tile) with zero rows past mg (a tile of channels a task), then each piece of the
 * output (the rows of pieces[7i..7i+6]: images' offsets into the frame, the packed weights'
 * and y's offsets, the image count, first and end output rows, the group's first channel)
 * computed as conv_direct_forward does, with the scale and shift per channel (or null) and
 * relu. With ``transposed`` (one group) the weights are read as (K, mg): a 1x1 convolution's
 * backward-data passes its forward's (M, C) weights as they lie. */
#define DEFINE_DIRECT_FRAMED(T, S, ISA, TARGET)                                               \
struct framed_##S##_##ISA {                                                                   \
    const T *x; T *frame; i64 planes; int bands, h, w, ph, pw, sw, hf, q;                     \
    const i64 *koff; int K; T *packed; T *y; i64 y_image, frame_image;                        \
    int mg, oh, ow, sh; const i64 *pieces; const T *weights; int tiles, tile;                 \
    const T *scale, *shift; int relu, transposed;                                             \
};                                                                                            \
static void frame_band_##S##_##ISA(void *job, int band)                                       \
{                                                                                             \
    const struct framed_##S##_##ISA *a = job;                                                 \
    if (band >= a->bands) {              /* a tile of weights: (group, tile index) */          \
        const int t = band - a->bands, g = t / a->tiles, first = t % a->tiles * a->tile;       \
        const int count = a->mg - first < a->tile ? a->mg - first : a->tile;                  \
        /* weights (group, mg, K), or with ``transposed`` (one group) (K, mg) */              \
        const i64 along_c = a->transposed ? 1 : a->K, along_k = a->transposed ? a->mg : 1;   \
        const T *from = a->weights + (i64)g * a->mg * a->K + first * along_c;                 \
        T *to = a->packed + ((i64)g * a->tiles * a->tile + first) * a->K;                     \
        for (int k = 0; k < a->K; ++k)                                                        \
            for (int c = 0; c < a->tile; ++c)                                                 \
                to[(i64)k * a->tile + c] = c < count ? from[c * along_c + k * along_k] : 0;   \
        return;                                                                               \
    }                                                                                         \
    const i64 p0 = a->planes * band / a->bands, p1 = a->planes * (band + 1) / a->bands;        \
    conv_frame_##S(a->x + p0 * a->h * a->w, a->frame + p0 * a->sw * a->hf * a->q, p1 - p0,    \
                   a->h, a->w, a->ph, a->pw, a->sw, a->hf, a->q);                             \
}                                                                                             \
static void direct_piece_##S##_##ISA(void *job, int index)                                    \
{                                                                                             \
    const struct framed_##S##_##ISA *a = job;                                                 \
    const i64 *p = a->pieces + 7 * (i64)index;                                                \
    conv_direct_forward_##S##_##ISA(a->frame + p[0], a->frame_image, a->koff, a->K,           \
                                    a->packed + p[1], a->y + p[2], a->y_image, p[3], 0, a->mg, \
                                    a->oh, a->ow, (int)p[4], (int)p[5], a->sh, a->q,          \
                                    a->scale ? a->scale + p[6] : 0,                           \
                                    a->shift ? a->shift + p[6] : 0, a->relu);                 \
}                                                                                             \
TARGET void conv_direct_forward_framed_##S##_##ISA(                                           \
    const T *x, T *frame, i64 planes, int h, int w, int ph, int pw, int sw, int hf, int q,    \
    const i64 *koff, int K, const T *weights, T *packed, int group, T *y, i64 y_image,        \
    i64 frame_image, int mg, int oh, int ow, int sh, const i64 *pieces, int count,            \
    const T *scale, const T *shift, int relu, int transposed, int threads)                    \
{                                                                                             \
    const int tile = conv_direct_tile_##S##_##ISA(ow), tiles = (mg + tile - 1) / tile;        \
    struct framed_##S##_##ISA job = {x, frame, planes, 1, h, w, ph, pw, sw, hf, q, koff, K,   \
                                     packed, y, y_image, frame_image, mg, oh, ow, sh, pieces, \
                                     weights, tiles, tile, scale, shift, relu, transposed};   \
    job.bands = threads < 2 ? 1 : (planes < 2 * threads ? (int)planes : 2 * threads);         \
    pieces_run(frame_band_##S##_##ISA, &job, job.bands + group * tiles, threads);             \
    pieces_run(direct_piece_##S##_##ISA, &job, count, threads);                               \
}

/* The backward-filter likewise: the frame, then the pieces (pieces[5i..5i+4]: the images'
 * offsets into the frame and into the padded gradient, the image count, first and end output
 * rows) in runs (pieces runs[r]..runs[r+1]-1), each run summed in order by one thread into its
 * own buffer partial + r * partial_run (written by its first piece, added to by the others),
 * every group of a piece in turn. The caller adds the runs' buffers in run order. */
#define DEFINE_DIRECT_FILTER_FRAMED(T, S, ISA, TARGET)                                        \
struct filter_##S##_##ISA {                                                                   \
    struct framed_##S##_##ISA frame; const T *dy; i64 dy_image; T *partial; i64 partial_run;  \
    i64 group_frame; int group, ow; const int *runs;                                          \
};                                                                                            \
static void filter_frame_band_##S##_##ISA(void *job, int band)                                \
{                                                                                             \
    frame_band_##S##_##ISA(&((struct filter_##S##_##ISA *)job)->frame, band);                 \
}                                                                                             \
static void filter_run_##S##_##ISA(void *job, int run)                                        \
{                                                                                             \
    const struct filter_##S##_##ISA *a = job;                                                 \
    const struct framed_##S##_##ISA *f = &a->frame;                                           \
    T *out = a->partial + run * a->partial_run;                                               \
    for (int i = a->runs[run]; i < a->runs[run + 1]; ++i) {                                   \
        const i64 *p = f->pieces + 5 * (i64)i;                                                \
        for (int g = 0; g < a->group; ++g)                                                    \
            conv_direct_backward_filter_##S##_##ISA(                                          \
                f->frame + p[0] + g * a->group_frame, f->frame_image, f->koff, f->K,          \
                a->dy + p[1] + (i64)g * f->mg * f->oh * a->ow, a->dy_image,                   \
                out + (i64)g * f->mg * f->K, i > a->runs[run], p[2], f->mg, f->oh, a->ow,     \
                (int)p[3], (int)p[4], f->sh, f->q);                                           \
    }                                                                                         \
}                                                                                             \
TARGET void conv_direct_backward_filter_framed_##S##_##ISA(                                   \
    const T *x, T *frame, i64 planes, int h, int w, int ph, int pw, int sw, int hf, int q,    \
    const i64 *koff, int K, const T *dy, i64 dy_image, T *partial, i64 partial_run,           \
    i64 frame_image, i64 group_frame, int group, int mg, int oh, int ow, int sh,              \
    const i64 *pieces, const int *runs, int run_count, int threads)                           \
{                                                                                             \
    struct filter_##S##_##ISA job = {                                                         \
        {x, frame, planes, 1, h, w, ph, pw, sw, hf, q, koff, K, NULL, NULL, 0, frame_image,   \
         mg, oh, 0, sh, pieces, NULL, 0, 0, NULL, NULL, 0, 0},                                \
        dy, dy_image, partial, partial_run, group_frame, group, ow, runs};                    \
    job.frame.bands = threads < 2 ? 1 : (planes < 2 * threads ? (int)planes : 2 * threads);   \
    pieces_run(filter_frame_band_##S##_##ISA, &job, job.frame.bands, threads);                \
    pieces_run(filter_run_##S##_##ISA, &job, run_count, threads);                             \
}

DEFINE_FRAME(float, f32)
DEFINE_FRAME(double, f64)
/* Tiles measured on AVX-512 (EPYC, 2 threads, float32), forward / backward-filter ms:
 * (32,32,16,16) to 32 channels 5x5 with the AVX2 build's tiles 2.39 / 4.47, with these 1.99 /
 * 2.46; (32,32,16,16) to 32 3x3 0.93 / 1.69 against 0.81 / 1.07; wide_half, (32,64,8,8) to 64
 * 3x3, forward 1.17 with 12 channels a tile, 0.91 with 16. */
#define DEFINE_DIRECT_ALL(T, S, V, VU, W, WU)                                                 \
    DEFINE_DIRECT(T, S, V, VU, fast, FAST, 6, 12, 2, 6)                                       \
    DEFINE_DIRECT(T, S, V, VU, baseline, BASELINE, 6, 12, 2, 6)                               \
    DEFINE_DIRECT(T, S, W, WU, wide, WIDE, 8, 16, 4, 4)                                       \
    DEFINE_DIRECT(T, S, V, VU, wide_half, WIDE, 8, 16, 4, 4)                                  \
    DEFINE_DIRECT_FRAMED(T, S, fast, FAST)                                                    \
    DEFINE_DIRECT_FRAMED(T, S, baseline, BASELINE)                                            \
    DEFINE_DIRECT_FRAMED(T, S, wide, WIDE)                                                    \
    DEFINE_DIRECT_FRAMED(T, S, wide_half, WIDE)                                               \
    DEFINE_DIRECT_FILTER_FRAMED(T, S, fast, FAST)                                             \
    DEFINE_DIRECT_FILTER_FRAMED(T, S, baseline, BASELINE)                                     \
    DEFINE_DIRECT_FILTER_FRAMED(T, S, wide, WIDE)                                             \
    DEFINE_DIRECT_FILTER_FRAMED(T, S, wide_half, WIDE)

DEFINE_DIRECT_ALL(float, f32, vf32, vf32u, vw32, vw32u)
DEFINE_DIRECT_ALL(double, f64, vf64, vf64u, vw64, vw64u)

/* -- Winograd convolution F(4x4, 3x3) and F(2x2, 5x5), float32 --------------------------------
 * A convolution with stride 1 forms each m x m block of an output plane from the 6x6 block
 * of input around it with 36 products per input channel (Lavin and Gray's F(m x m, r x r)):
 * F(4x4, 3x3) instead of 144, F(2x2, 5x5) instead of 100. Y = A^T [sum over c of (G g G^T)
 * * (B^T d B)] A, * elementwise, with the same six points (0, 1, -1, 2, -2, infinity) for
 * both, hence the same
 *   B^T = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0;
 *          0 4 0 -5 0 1],
 * and for r = 3, m = 4
 *   G   = [1/4 0 0; -1/6 -1/6 -1/6; -1/6 1/6 -1/6; 1/24 1/12 1/6; 1/24 -1/12 1/6; 0 0 1],
 *   A^T = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1],
 * for r = 5, m = 2
 *   G   = [1/4 0 0 0 0; -1/6 (x5); -1/6 1/6 -1/6 1/6 -1/6; (1 2 4 8 16)/24;
 *          (1 -2 4 -8 16)/24; 0 0 0 0 1],
 *   A^T = [1 1 1 1 1 0; 0 1 -1 2 -2 1],
 * the transformed position xi = 6 i + j of the 6x6 domain. Vectors run along channels
 * (L lanes; channel counts padded with zeros to cp and kp, multiples of L). Layouts:
 *   frame (n, hp, wp, cp): the images zero-padded (pad, then up to whole blocks), channels
 *         last (copied in L x L tiles turned in registers), hp = m th + 6 - m rows for th
 *         block rows (wp likewise for tw block columns), in the calling thread's scratch;
 *   u     (36, kp / L, cp, L): the transformed weights, a panel of cp x L values for each
 *         vector of output channels;
 *   v     (blocks, 36, cp) and s (blocks, 36, band): a piece's transformed input blocks and
 *         their products with u summed over c, in its thread's scratch.
 * A piece is a chunk of blocks (in order image, block row, block column) and a band of
 * output channels: it transforms its blocks' input, forms for every xi the sum over c (in
 * order) of v times u, transforms each block back, applies scale, shift and relu as the
 * direct kernel does, and stores the block's outputs inside the image (turned back to
 * planes in registers). Each output is the same sum however the work is cut. */
#define WINO_INPUT(o, d0, d1, d2, d3, d4, d5)                                                 \
    {                                                                                         \
        o[0] = 4.0f * d0 - 5.0f * d2 + d4;                                                    \
        o[1] = d3 + d4 - 4.0f * (d1 + d2);                                                    \
        o[2] = 4.0f * (d1 - d2) + d4 - d3;                                                    \
        o[3] = 2.0f * (d3 - d1) + d4 - d2;                                                    \
        o[4] = 2.0f * (d1 - d3) + d4 - d2;                                                    \
        o[5] = 4.0f * d1 - 5.0f * d3 + d5;                                                    \
    }
#define WINO_FILTER(o, g0, g1, g2)                                                            \
    {                                                                                         \
        o[0] = 0.25f * g0;                                                                    \
        o[1] = (g0 + g1 + g2) * (-1.0f / 6);                                                  \
        o[2] = (g0 - g1 + g2) * (-1.0f / 6);                                                  \
        o[3] = (1.0f / 24) * g0 + (1.0f / 12) * g1 + (1.0f / 6) * g2;                         \
        o[4] = (1.0f / 24) * g0 - (1.0f / 12) * g1 + (1.0f / 6) * g2;                         \
        o[5] = g2;                                                                            \
    }
#define WINO_OUTPUT(o, m0, m1, m2, m3, m4, m5)                                                \
    {                                                                                         \
        const __typeof__(m0) p12 = m1 + m2, n12 = m1 - m2, p34 = m3 + m4, n34 = m3 - m4;      \
        o[0] = m0 + p12 + p34;                                                                \
        o[1] = n12 + 2.0f * n34;                                                              \
        o[2] = p12 + 4.0f * p34;                                                              \
        o[3] = n12 + 8.0f * n34 + m5;                                                         \
    }
#define WINO_FILTER5(o, g0, g1, g2, g3, g4)                                                   \
    {                                                                                         \
        const __typeof__(g0) even = g0 + g2 + g4, odd = g1 + g3;                              \
        const __typeof__(g0) even4 = g0 + 4.0f * g2 + 16.0f * g4,                            \
                             odd4 = 2.0f * g1 + 8.0f * g3;                                    \
        o[0] = 0.25f * g0;                                                                    \
        o[1] = (even + odd) * (-1.0f / 6);                                                    \
        o[2] = (even - odd) * (-1.0f / 6);                                                    \
        o[3] = (even4 + odd4) * (1.0f / 24);                                                  \
        o[4] = (even4 - odd4) * (1.0f / 24);                                                  \
        o[5] = g4;                                                                            \
    }
#define WINO_OUTPUT2(o, m0, m1, m2, m3, m4, m5)                                               \
    {                                                                                         \
        o[0] = m0 + m1 + m2 + m3 + m4;                                                        \
        o[1] = m1 - m2 + 2.0f * (m3 - m4) + m5;                                               \
    }

/* The backward-filter's transforms, the adjoints of the forward's: A dY A^T of an m x m block
 * of the output gradient (one dimension: m values to 6) and G^T m G of the summed products
 * (6 values to r). */
#define WINO_GRADIENT(o, y0, y1, y2, y3)                                                      \
    {                                                                                         \
        const __typeof__(y0) even1 = y0 + y2, odd1 = y1 + y3, even4 = y0 + 4.0f * y2,         \
                             odd4 = 2.0f * y1 + 8.0f * y3;                                    \
        o[0] = y0;                                                                            \
        o[1] = even1 + odd1;                                                                  \
        o[2] = even1 - odd1;                                                                  \
        o[3] = even4 + odd4;                                                                  \
        o[4] = even4 - odd4;                                                                  \
        o[5] = y3;                                                                            \
    }
#define WINO_FILTER_GRADIENT(o, m0, m1, m2, m3, m4, m5)                                       \
    {                                                                                         \
        o[0] = 0.25f * m0 - (1.0f / 6) * (m1 + m2) + (1.0f / 24) * (m3 + m4);                 \
        o[1] = (1.0f / 6) * (m2 - m1) + (1.0f / 12) * (m3 - m4);                              \
        o[2] = (1.0f / 6) * (m3 + m4 - m1 - m2) + m5;                                         \
    }
#define WINO_GRADIENT2(o, y0, y1)                                                             \
    {                                                                                         \
        o[0] = y0;                                                                            \
        o[1] = y0 + y1;                                                                       \
        o[2] = y0 - y1;                                                                       \
        o[3] = y0 + 2.0f * y1;                                                                \
        o[4] = y0 - 2.0f * y1;                                                                \
        o[5] = y1;                                                                            \
    }
#define WINO_FILTER_GRADIENT5(o, m0, m1, m2, m3, m4, m5)                                      \
    {                                                                                         \
        const __typeof__(m0) sum12 = m1 + m2, less12 = m2 - m1, sum34 = m3 + m4,              \
                             less34 = m3 - m4;                                                \
        o[0] = 0.25f * m0 - (1.0f / 6) * sum12 + (1.0f / 24) * sum34;                         \
        o[1] = (1.0f / 6) * less12 + (1.0f / 12) * less34;                                    \
        o[2] = (1.0f / 6) * (sum34 - sum12);                                                  \
        o[3] = (1.0f / 6) * less12 + (1.0f / 3) * less34;                                     \
        o[4] = (2.0f / 3) * sum34 - (1.0f / 6) * sum12 + m5;                                  \
    }

/* m[a][b L ..] (plus what it holds, with `accumulate`) + the sum over blocks t (in order) of
 * z[t][a] * v[t][b L ..], for TT rows a of output channels and KV vectors b of input
 * channels; rows of m cp values apart. */
#define WINO_GRADIENT_TILE(V, TT, KV, z, v, m)                                                \
    {                                                                                         \
        V acc[TT][KV];                                                                        \
        for (int a = 0; a < TT; ++a)                                                          \
            for (int b = 0; b < KV; ++b)                                                      \
                acc[a][b] = accumulate ? *(const V *)((m) + (i64)a * cp + b * L) : (V){0};    \
        const float *zr = (z), *vr = (v);                                                     \
        for (int t = 0; t < blocks; ++t, zr += zs, vr += vs) {                                \
            V vv[KV];                                                                         \
            for (int b = 0; b < KV; ++b) vv[b] = *(const V *)(vr + b * L);                    \
            for (int a = 0; a < TT; ++a) {                                                    \
                const float value = zr[a];                                                    \
                for (int b = 0; b < KV; ++b) acc[a][b] += value * vv[b];                      \
            }                                                                                 \
        }                                                                                     \
        for (int a = 0; a < TT; ++a)                                                          \
            for (int b = 0; b < KV; ++b) *(V *)((m) + (i64)a * cp + b * L) = acc[a][b];       \
    }

/* All kp rows of m for KV vectors of input channels: TT rows at a time, then 8, 4, 2, 1. */
#define DEFINE_WINO_GRADIENT_TILES(V, ISA, TARGET, KV, TT)                                    \
static TARGET void wino_gradient_tiles_##KV##_##ISA(const float *z, const float *v, float *m, \
                                                    int blocks, int cp, int kp,               \
                                                    int accumulate)                           \
{                                                                                             \
    const int L = (int)(sizeof(V) / sizeof(float));                                           \
    const i64 zs = 36 * (i64)kp, vs = 36 * (i64)cp;                                           \
    int k = 0;                                                                                \
    for (; k + TT <= kp; k += TT) WINO_GRADIENT_TILE(V, TT, KV, z + k, v, m + (i64)k * cp)    \
    if (TT > 8)                                                                               \
        for (; k + 8 <= kp; k += 8) WINO_GRADIENT_TILE(V, 8, KV, z + k, v, m + (i64)k * cp)   \
    if (TT > 4)                                                                               \
        for (; k + 4 <= kp; k += 4) WINO_GRADIENT_TILE(V, 4, KV, z + k, v, m + (i64)k * cp)   \
    for (; k + 2 <= kp; k += 2) WINO_GRADIENT_TILE(V, 2, KV, z + k, v, m + (i64)k * cp)       \
    for (; k < kp; ++k) WINO_GRADIENT_TILE(V, 1, KV, z + k, v, m + (i64)k * cp)               \
}

/* s[a][b L ..] = sum over c of v[a][c] * u's panel b at c, for TT rows a (rows vs and ss
 * values apart) and KV vectors b. */
#define WINO_TILE(V, VU, TT, KV, v, s)                                                        \
    {                                                                                         \
        V acc[TT][KV];                                                                        \
        for (int a = 0; a < TT; ++a)                                                          \
            for (int b = 0; b < KV; ++b) acc[a][b] = (V){0};                                  \
        const float *ur = u;                                                                  \
        for (int c = 0; c < cp; ++c, ur += L) {                                               \
            V uv[KV];                                                                         \
            for (int b = 0; b < KV; ++b) uv[b] = *(const VU *)(ur + (i64)b * cp * L);         \
            for (int a = 0; a < TT; ++a) {                                                    \
                const float value = (v)[a * vs + c];                                          \
                for (int b = 0; b < KV; ++b) acc[a][b] += value * uv[b];                      \
            }                                                                                 \
        }                                                                                     \
        for (int a = 0; a < TT; ++a)                                                          \
            for (int b = 0; b < KV; ++b) *(V *)((s) + a * ss + b * L) = acc[a][b];            \
    }

/* All blocks' rows for KV vectors of output channels: TT rows at a time, then 8, 4, 2, 1. */
#define DEFINE_WINO_TILES(V, VU, ISA, TARGET, KV, TT)                                         \
static TARGET void wino_tiles_##KV##_##ISA(const float *v, const float *u, float *s,          \
                                           int blocks, int cp, int band)                      \
{                                                                                             \
    const int L = (int)(sizeof(V) / sizeof(float));                                           \
    const i64 vs = 36 * (i64)cp, ss = 36 * (i64)band;                                         \
    int t = 0;                                                                                \
    for (; t + TT <= blocks; t += TT) WINO_TILE(V, VU, TT, KV, v + t * vs, s + t * ss)        \
    if (TT > 8)                                                                               \
        for (; t + 8 <= blocks; t += 8) WINO_TILE(V, VU, 8, KV, v + t * vs, s + t * ss)       \
    if (TT > 4)                                                                               \
        for (; t + 4 <= blocks; t += 4) WINO_TILE(V, VU, 4, KV, v + t * vs, s + t * ss)       \
    for (; t + 2 <= blocks; t += 2) WINO_TILE(V, VU, 2, KV, v + t * vs, s + t * ss)           \
    for (; t < blocks; ++t) WINO_TILE(V, VU, 1, KV, v + t * vs, s + t * ss)                   \
}

/* rows[0..L-1] (an L x L matrix of floats, a row a vector) transposed in place: for each
 * b = 1, 2, 4, ..., entries (i, j) with bit b of j set and bit b of i clear trade places
 * with (i + b, j - b); lane j of row i then comes from lane KEEP(j) of the pair (row i,
 * row i + b) taken as one 2L-lane vector, and lane j of row i + b from lane TAKE(j). */
#define KEEP(j, b, L) ((j) & (b) ? (L) + (j) - (b) : (j))
#define TAKE(j, b, L) ((j) & (b) ? (L) + (j) : (j) + (b))
#define LANES_8(F, b) F(0, b, 8), F(1, b, 8), F(2, b, 8), F(3, b, 8), F(4, b, 8), F(5, b, 8), \
    F(6, b, 8), F(7, b, 8)
#define LANES_16(F, b) F(0, b, 16), F(1, b, 16), F(2, b, 16), F(3, b, 16), F(4, b, 16),       \
    F(5, b, 16), F(6, b, 16), F(7, b, 16), F(8, b, 16), F(9, b, 16), F(10, b, 16),            \
    F(11, b, 16), F(12, b, 16), F(13, b, 16), F(14, b, 16), F(15, b, 16)
#if defined(__GNUC__) && !defined(__clang__)
#define DEFINE_TRANSPOSE(V, VI, ISA, TARGET, LANES)                                           \
static inline __attribute__((always_inline)) TARGET void transpose_##ISA(V *rows)            \
{                                                                                             \
    _Pragma("GCC unroll 4")                                                                   \
    for (int b = 1; b < LANES; b *= 2) {                                                      \
        const VI keep = {LANES_##LANES(KEEP, b)}, take = {LANES_##LANES(TAKE, b)};            \
        _Pragma("GCC unroll 16")                                                              \
        for (int i = 0; i < LANES; ++i)                                                       \
            if (!(i & b)) {                                                                   \
                const V low = rows[i], high = rows[i + b];                                    \
                rows[i] = __builtin_shuffle(low, high, keep);                                 \
                rows[i + b] = __builtin_shuffle(low, high, take);                             \
            }                                                                                 \
    }                                                                                         \
}
#else   /* compilers without GCC's __builtin_shuffle: through memory */
#define DEFINE_TRANSPOSE(V, VI, ISA, TARGET, LANES)                                           \
static inline TARGET void transpose_##ISA(V *rows)                                           \
{                                                                                             \
    float values[LANES][LANES], turned[LANES][LANES];                                         \
    memcpy(values, rows, sizeof values);                                                      \
    for (int i = 0; i < LANES; ++i)                                                           \
        for (int j = 0; j < LANES; ++j) turned[i][j] = values[j][i];                          \
    memcpy(rows, turned, sizeof turned);                                                      \
}
#endif

/* A thread's scratch, grown as needed and kept: native.c's workers and the calling threads
 * live as long as the process, and a piece's scratch is then already in cache and mapped. */
struct scratch { float *memory; size_t floats; };
static _Thread_local struct scratch wino_frame_scratch, wino_piece_scratch;

static float *scratch_floats(struct scratch *s, size_t floats)
{
    if (floats > s->floats) {
        free(s->memory);
        s->floats = 0;
        s->memory = aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64);
        if (s->memory) s->floats = floats;
    }
    return s->memory;
}

/* Tiles (rows x vectors of output channels): KV_MAX vectors at most; TTk rows for k vectors. */
#define DEFINE_WINOGRAD(V, VU, VI, LANES, ISA, TARGET, KV_MAX, TT1, TT2, TT3, TT4)            \
DEFINE_WINO_TILES(V, VU, ISA, TARGET, 1, TT1)                                                 \
DEFINE_WINO_TILES(V, VU, ISA, TARGET, 2, TT2)                                                 \
DEFINE_WINO_TILES(V, VU, ISA, TARGET, 3, TT3)                                                 \
DEFINE_WINO_TILES(V, VU, ISA, TARGET, 4, TT4)                                                 \
DEFINE_WINO_GRADIENT_TILES(V, ISA, TARGET, 1, TT1)                                            \
DEFINE_WINO_GRADIENT_TILES(V, ISA, TARGET, 2, TT2)                                            \
DEFINE_WINO_GRADIENT_TILES(V, ISA, TARGET, 3, TT3)                                            \
DEFINE_WINO_GRADIENT_TILES(V, ISA, TARGET, 4, TT4)                                            \
DEFINE_TRANSPOSE(V, VI, ISA, TARGET, LANES)                                                   \
                                                                                              \
struct wino_##ISA {                                                                           \
    const float *x, *w, *u, *scale, *shift, *dy; float *frame, *y, *dw, *gradient, *v, *z, *m; \
    int n, c, h, wd, ph, pw, cp, kp, k, oh, ow, edge, r, th, tw, hp, wp, relu, flipped;       \
    int frame_bands, chunk, blocks, band, bands, pass, pass_blocks;                           \
    atomic_int failed;                                                                        \
};                                                                                            \
                                                                                              \
/* Pieces of the weights' transform: a vector of output channels each, u's panel for it. The  \
 * weights are w (k, c, r, r), or with `flipped` w (c, k, r, r) flipped in space with input   \
 * and output channels swapped (the backward-data's convolution). */                          \
static TARGET void wino_weights_piece_##ISA(void *job, int index)                             \
{                                                                                             \
    const struct wino_##ISA *a = job;                                                         \
    enum { L = sizeof(V) / sizeof(float) };                                                   \
    const int k0 = index * L, cp = a->cp;                                                     \
    float *panel = (float *)a->u + (i64)k0 * cp;                                              \
    const int r = a->r, taps = r * r;                                                         \
    for (int ci = 0; ci < cp; ++ci) {                                                         \
        V g[5][5], filtered[5][6];                                                            \
        for (int e = 0; e < taps; ++e) {                                                      \
            float lanes[L];                                                                   \
            for (int l = 0; l < L; ++l)                                                       \
                lanes[l] = k0 + l >= a->k || ci >= a->c ? 0                                   \
                    : a->flipped ? a->w[((i64)ci * a->k + k0 + l) * taps + taps - 1 - e]      \
                    : a->w[((i64)(k0 + l) * a->c + ci) * taps + e];                           \
            memcpy(&g[e / r][e % r], lanes, sizeof lanes);                                    \
        }                                                                                     \
        for (int i = 0; i < r; ++i)                                                           \
            if (r == 3) WINO_FILTER(filtered[i], g[i][0], g[i][1], g[i][2])                   \
            else WINO_FILTER5(filtered[i], g[i][0], g[i][1], g[i][2], g[i][3], g[i][4])       \
        for (int jj = 0; jj < 6; ++jj) {                                                      \
            V o[6];                                                                           \
            if (r == 3) WINO_FILTER(o, filtered[0][jj], filtered[1][jj], filtered[2][jj])     \
            else WINO_FILTER5(o, filtered[0][jj], filtered[1][jj], filtered[2][jj],           \
                              filtered[3][jj], filtered[4][jj])                               \
            for (int ii = 0; ii < 6; ++ii)                                                    \
                *(VU *)(panel + (i64)(6 * ii + jj) * a->kp * cp + (i64)ci * L) = o[ii];       \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* Rows r0..r1-1 of images (channels, h, wd) copied channels last into rows of `width`        \
 * positions of `stride` values (rows_each a image): row r holds image row r % rows_each -    \
 * top from column left on, zeros elsewhere (outside the image, channels past `channels`). */ \
static TARGET void channels_last_rows_##ISA(const float *images, int channels, int h, int wd, \
                                            int top, int left, float *rows, int rows_each,    \
                                            int width, int stride, i64 r0, i64 r1)            \
{                                                                                             \
    enum { L = sizeof(V) / sizeof(float) };                                                   \
    const i64 plane = (i64)h * wd;                                                            \
    for (i64 r = r0; r < r1; ++r) {                                                           \
        const int img = (int)(r / rows_each), iy = (int)(r % rows_each) - top;                \
        float *out = rows + r * width * stride + (i64)left * stride;                          \
        if (iy < 0 || iy >= h || channels < stride) {     /* else only the side columns */   \
            memset(out - (i64)left * stride, 0, sizeof(float) * width * stride);              \
            if (iy < 0 || iy >= h) continue;                                                  \
        } else {                                                                              \
            memset(out - (i64)left * stride, 0, sizeof(float) * left * stride);               \
            memset(out + (i64)wd * stride, 0, sizeof(float) * (width - left - wd) * stride);  \
        }                                                                                     \
        const float *in = images + (i64)img * channels * plane + (i64)iy * wd;                \
        for (int c0 = 0; c0 < channels; c0 += L)                                              \
            for (int x0 = 0; x0 < wd; x0 += L) {                                              \
                if (c0 + L <= channels && x0 + L <= wd) {                                     \
                    V tile[L];                                                                \
                    for (int l = 0; l < L; ++l)                                               \
                        tile[l] = *(const VU *)(in + (c0 + l) * plane + x0);                  \
                    transpose_##ISA(tile);                                                    \
                    for (int l = 0; l < L; ++l)                                               \
                        *(VU *)(out + (i64)(x0 + l) * stride + c0) = tile[l];                 \
                    continue;                                                                 \
                }                                                                             \
                for (int ci = c0; ci < c0 + L && ci < channels; ++ci)                         \
                    for (int ix = x0; ix < x0 + L && ix < wd; ++ix)                           \
                        out[(i64)ix * stride + ci] = in[ci * plane + ix];                     \
            }                                                                                 \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* Pieces of the frame: bands of its rows. */                                                 \
static TARGET void wino_frame_band_##ISA(void *job, int index)                                \
{                                                                                             \
    const struct wino_##ISA *a = job;                                                         \
    const i64 rows = (i64)a->n * a->hp;                                                       \
    channels_last_rows_##ISA(a->x, a->c, a->h, a->wd, a->ph, a->pw, a->frame, a->hp, a->wp,   \
                             a->cp, rows * index / a->frame_bands,                            \
                             rows * (index + 1) / a->frame_bands);                            \
}                                                                                             \
                                                                                              \
/* v[t] (36 x cp) = B^T d B for blocks t0..t0+blocks-1, each channel's 6x6 input block d. */  \
static inline __attribute__((always_inline)) TARGET void wino_input_blocks_##ISA(             \
    const struct wino_##ISA *a, int t0, int blocks, float *v)                                 \
{                                                                                             \
    enum { L = sizeof(V) / sizeof(float) };                                                   \
    const int cp = a->cp, per_image = a->th * a->tw, m = a->edge;                             \
    for (int t = 0; t < blocks; ++t) {                                                        \
        const int block = t0 + t, img = block / per_image;                                    \
        const int by = block % per_image / a->tw, bx = block % a->tw;                         \
        const float *corner =                                                                 \
            a->frame + (((i64)img * a->hp + m * by) * a->wp + m * bx) * cp;                   \
        for (int c0 = 0; c0 < cp; c0 += L) {                                                  \
            V rows[6][6];                                                                     \
            for (int i = 0; i < 6; ++i) {                                                     \
                const float *d = corner + (i64)i * a->wp * cp + c0;                           \
                WINO_INPUT(rows[i], *(const VU *)d, *(const VU *)(d + cp),                    \
                           *(const VU *)(d + 2 * cp), *(const VU *)(d + 3 * cp),              \
                           *(const VU *)(d + 4 * cp), *(const VU *)(d + 5 * cp))              \
            }                                                                                 \
            for (int jj = 0; jj < 6; ++jj) {                                                  \
                V o[6];                                                                       \
                WINO_INPUT(o, rows[0][jj], rows[1][jj], rows[2][jj], rows[3][jj],             \
                           rows[4][jj], rows[5][jj])                                          \
                for (int ii = 0; ii < 6; ++ii)                                                \
                    *(V *)(v + ((i64)t * 36 + 6 * ii + jj) * cp + c0) = o[ii];                \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* One block's outputs for L output channels from `first` (count of them in the image):       \
 * out[r][q] holds output (oy0 + r, ox0 + q) of each channel in its lanes, r and q < m; with  \
 * scale, shift and relu applied, stored: 4x4 blocks turned to planes in registers, 2x2 ones  \
 * value by value. */                                                                         \
static inline __attribute__((always_inline)) TARGET void wino_store_##ISA(                    \
    const struct wino_##ISA *a, V out[4][4], int img, int first, int count, int oy0, int ox0) \
{                                                                                             \
    enum { L = sizeof(V) / sizeof(float) };                                                   \
    const int m = a->edge;                                                                    \
    const int rows_in = a->oh - oy0 < m ? a->oh - oy0 : m;                                    \
    const int cols_in = a->ow - ox0 < m ? a->ow - ox0 : m;                                    \
    float scale[L] = {0}, shift[L] = {0};                                                     \
    if (a->scale) memcpy(scale, a->scale + first, sizeof(float) * count);                     \
    if (a->shift) memcpy(shift, a->shift + first, sizeof(float) * count);                     \
    V scale_v, shift_v;                                                                       \
    memcpy(&scale_v, scale, sizeof scale_v);                                                  \
    memcpy(&shift_v, shift, sizeof shift_v);                                                  \
    for (int r = 0; r < m; ++r)                                                               \
        for (int q = 0; q < m; ++q) {                                                         \
            V value = out[r][q];                                                              \
            if (a->scale) value *= scale_v;                                                   \
            if (a->shift) value += shift_v;                                                   \
            if (a->relu) VECTOR_RELU(value)                                                   \
            out[r][q] = value;                                                                \
        }                                                                                     \
    if (m == 2) {                                                                             \
        float values[2][2][L];                                                                \
        for (int r = 0; r < 2; ++r)                                                           \
            for (int q = 0; q < 2; ++q) memcpy(values[r][q], &out[r][q], sizeof(V));          \
        for (int l = 0; l < count; ++l) {                                                     \
            float *plane = a->y + ((i64)img * a->k + first + l) * a->oh * a->ow;              \
            for (int r = 0; r < rows_in; ++r)                                                 \
                for (int q = 0; q < cols_in; ++q)                                             \
                    plane[(i64)(oy0 + r) * a->ow + ox0 + q] = values[r][q][l];                \
        }                                                                                     \
        return;                                                                               \
    }                                                                                         \
    for (int g = 0; g < 16 / L; ++g) {      /* L of the 16 outputs at a time */               \
        V tile[L];                                                                            \
        for (int p = 0; p < L; ++p) tile[p] = out[(g * L + p) / 4][(g * L + p) % 4];          \
        transpose_##ISA(tile);              /* tile[l]: channel first + l's outputs */        \
        for (int l = 0; l < count; ++l) {                                                     \
            float values[L];                                                                  \
            memcpy(values, &tile[l], sizeof values);                                          \
            float *plane = a->y + ((i64)img * a->k + first + l) * a->oh * a->ow;              \
            for (int q = 0; q < L / 4; ++q) {                                                 \
                const int r = g * L / 4 + q;                                                  \
                if (r >= rows_in) break;                                                      \
                float *row = plane + (i64)(oy0 + r) * a->ow + ox0;                            \
                if (cols_in == 4) memcpy(row, values + 4 * q, 4 * sizeof(float));             \
                else memcpy(row, values + 4 * q, cols_in * sizeof(float));                    \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
                                                                                              \
static TARGET void wino_piece_##ISA(void *job, int index)                                     \
{                                                                                             \
    struct wino_##ISA *a = job;                                                               \
    enum { L = sizeof(V) / sizeof(float) };                                                   \
    const int cp = a->cp, kp = a->kp;                                                         \
    const int t0 = index / a->bands * a->chunk, k0 = index % a->bands * a->band;              \
    const int blocks = a->blocks - t0 < a->chunk ? a->blocks - t0 : a->chunk;                 \
    const int band = kp - k0 < a->band ? kp - k0 : a->band;                                   \
    float *v = scratch_floats(&wino_piece_scratch, (size_t)36 * blocks * (cp + band));        \
    if (!v) {                                                                                 \
        atomic_store(&a->failed, 1);                                                          \
        return;                                                                               \
    }                                                                                         \
    float *s = v + (size_t)36 * blocks * cp;                                                  \
    const int per_image = a->th * a->tw;                                                      \
    wino_input_blocks_##ISA(a, t0, blocks, v);                                                \
    for (int xi = 0; xi < 36; ++xi) {                                                         \
        const float *vx = v + (i64)xi * cp, *ux = a->u + ((i64)xi * kp + k0) * cp;            \
        float *sx = s + (i64)xi * band;                                                       \
        for (int kk = 0; kk < band;) {                                                        \
            const int left = (band - kk) / L, kv = left < KV_MAX ? left : KV_MAX;             \
            const float *uk = ux + (i64)kk * cp;                                              \
            if (kv >= 4) wino_tiles_4_##ISA(vx, uk, sx + kk, blocks, cp, band);               \
            else if (kv == 3) wino_tiles_3_##ISA(vx, uk, sx + kk, blocks, cp, band);          \
            else if (kv == 2) wino_tiles_2_##ISA(vx, uk, sx + kk, blocks, cp, band);          \
            else wino_tiles_1_##ISA(vx, uk, sx + kk, blocks, cp, band);                       \
            kk += kv * L;                                                                     \
        }                                                                                     \
    }                                                                                         \
    for (int t = 0; t < blocks; ++t) {                                                        \
        const int block = t0 + t, img = block / per_image;                                    \
        const int m = a->edge, oy0 = block % per_image / a->tw * m, ox0 = block % a->tw * m;  \
        for (int kk = 0; kk < band && k0 + kk < a->k; kk += L) {                              \
            V half[6][4], out[4][4];                                                          \
            for (int ii = 0; ii < 6; ++ii) {                                                  \
                const float *sum = s + ((i64)t * 36 + 6 * ii) * band + kk;                    \
                const V m0 = *(const V *)sum, m1 = *(const V *)(sum + band),                  \
                        m2 = *(const V *)(sum + 2 * band), m3 = *(const V *)(sum + 3 * band), \
                        m4 = *(const V *)(sum + 4 * band), m5 = *(const V *)(sum + 5 * band); \
                if (m == 4) WINO_OUTPUT(half[ii], m0, m1, m2, m3, m4, m5)                     \
                else WINO_OUTPUT2(half[ii], m0, m1, m2, m3, m4, m5)                           \
            }                                                                                 \
            for (int q = 0; q < m; ++q) {                                                     \
                V o[4] = {0};                                                                 \
                if (m == 4)                                                                   \
                    WINO_OUTPUT(o, half[0][q], half[1][q], half[2][q], half[3][q],            \
                                half[4][q], half[5][q])                                       \
                else WINO_OUTPUT2(o, half[0][q], half[1][q], half[2][q], half[3][q],          \
                                  half[4][q], half[5][q])                                     \
                for (int r = 0; r < m; ++r) out[r][q] = o[r];                                 \
            }                                                                                 \
            const int first = k0 + kk;                                                        \
            wino_store_##ISA(a, out, img, first, a->k - first < L ? a->k - first : L, oy0,    \
                             ox0);                                                            \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* y (n, k, oh, ow) = the convolution of x (n, c, h, wd) padded by (ph, pw) with the r x r    \
 * weights w (as wino_weights_piece reads them, `flipped` or not), F(4x4, 3x3) or F(2x2,      \
 * 5x5); then times scale, plus shift (k values each, or null) and relu as the direct kernel  \
 * applies them. u is their transform when w equals copy (unless `force`); else copy = w and  \
 * u is made anew first. Blocks in chunks of `chunk`, output channels in bands of `band`.     \
 * Returns 0, or 1 when a thread's scratch could not be allocated. */                         \
TARGET int winograd_forward_f32_##ISA(                                                        \
    const float *x, const float *w, float *copy, float *u, float *y, int force, int flipped,  \
    int r, int n, int c, int h, int wd, int ph, int pw, int cp, int kp, int k, int oh,        \
    int ow, int chunk, int band, const float *scale, const float *shift, int relu,            \
    int threads)                                                                              \
{                                                                                             \
    enum { L = sizeof(V) / sizeof(float) };                                                   \
    const int m = r == 3 ? 4 : 2, th = (oh + m - 1) / m, tw = (ow + m - 1) / m;               \
    struct wino_##ISA job = {                                                                 \
        .x = x, .w = w, .u = u, .scale = scale, .shift = shift, .y = y, .n = n, .c = c,       \
        .h = h, .wd = wd, .ph = ph, .pw = pw, .cp = cp, .kp = kp, .k = k, .oh = oh, .ow = ow, \
        .edge = m, .r = r, .th = th, .tw = tw, .hp = m * th + 6 - m, .wp = m * tw + 6 - m,    \
        .relu = relu, .flipped = flipped, .chunk = chunk, .blocks = n * th * tw,              \
        .band = band, .bands = (kp + band - 1) / band};                                       \
    const size_t weight_bytes = sizeof(float) * r * r * (size_t)k * c;                        \
    if (force || memcmp(w, copy, weight_bytes) != 0) {                                        \
        memcpy(copy, w, weight_bytes);                                                        \
        pieces_run(wino_weights_piece_##ISA, &job, kp / L, threads);                          \
    }                                                                                         \
    job.frame = scratch_floats(&wino_frame_scratch, (size_t)n * job.hp * job.wp * cp);        \
    if (!job.frame) return 1;                                                                 \
    job.frame_bands = threads < 2 ? 1 : 2 * threads;                                          \
    pieces_run(wino_frame_band_##ISA, &job, job.frame_bands, threads);                        \
    const int chunks = (job.blocks + chunk - 1) / chunk;                                      \
    pieces_run(wino_piece_##ISA, &job, chunks * job.bands, threads);                          \
    return atomic_load(&job.failed);                                                          \
}                                                                                             \
                                                                                              \
/* The backward-filter's pieces: the output gradient channels last, bands of its rows. */     \
static TARGET void wino_gradient_band_##ISA(void *job, int index)                             \
{                                                                                             \
    const struct wino_##ISA *a = job;                                                         \
    const i64 rows = (i64)a->n * a->edge * a->th;                                             \
    channels_last_rows_##ISA(a->dy, a->k, a->oh, a->ow, 0, 0, a->gradient, a->edge * a->th,   \
                             a->edge * a->tw, a->kp, rows * index / a->frame_bands,           \
                             rows * (index + 1) / a->frame_bands);                            \
}                                                                                             \
/* ... a chunk of the pass's blocks: v[t] = B^T d B, z[t] = A dY A^T (dY its m x m block of   \
 * the output gradient, zero past the plane), t counted from the pass's first block. */       \
static TARGET void wino_gradient_blocks_##ISA(void *job, int index)                           \
{                                                                                             \
    const struct wino_##ISA *a = job;                                                         \
    enum { L = sizeof(V) / sizeof(float) };                                                   \
    const int first = index * a->chunk, kp = a->kp, per_image = a->th * a->tw;                \
    const int blocks = a->pass_blocks - first < a->chunk ? a->pass_blocks - first : a->chunk; \
    wino_input_blocks_##ISA(a, a->pass + first, blocks, a->v + (i64)first * 36 * a->cp);      \
    for (int i = first; i < first + blocks; ++i) {                                            \
        const int t = a->pass + i;                                                            \
        const int img = t / per_image, by = t % per_image / a->tw, bx = t % a->tw;            \
        const int m = a->edge, row = m * a->tw * kp;                                          \
        const float *corner = a->gradient + (((i64)img * m * a->th + m * by) * m * a->tw      \
                                             + m * bx) * kp;                                  \
        for (int k0 = 0; k0 < kp; k0 += L) {                                                  \
            V rows[4][6];                                                                     \
            for (int r = 0; r < m; ++r) {                                                     \
                const float *d = corner + (i64)r * row + k0;                                  \
                if (m == 4)                                                                   \
                    WINO_GRADIENT(rows[r], *(const VU *)d, *(const VU *)(d + kp),             \
                                  *(const VU *)(d + 2 * kp), *(const VU *)(d + 3 * kp))       \
                else WINO_GRADIENT2(rows[r], *(const VU *)d, *(const VU *)(d + kp))           \
            }                                                                                 \
            for (int jj = 0; jj < 6; ++jj) {                                                  \
                V o[6];                                                                       \
                if (m == 4)                                                                   \
                    WINO_GRADIENT(o, rows[0][jj], rows[1][jj], rows[2][jj], rows[3][jj])      \
                else WINO_GRADIENT2(o, rows[0][jj], rows[1][jj])                              \
                for (int ii = 0; ii < 6; ++ii)                                                \
                    *(V *)(a->z + ((i64)i * 36 + 6 * ii + jj) * kp + k0) = o[ii];             \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
/* ... a transformed position xi: m[xi] (kp x cp) = the sum over the pass's blocks of z x v,  \
 * added to the earlier passes'. */                                                           \
static TARGET void wino_gradient_sums_##ISA(void *job, int xi)                                \
{                                                                                             \
    const struct wino_##ISA *a = job;                                                         \
    enum { L = sizeof(V) / sizeof(float) };                                                   \
    const int cp = a->cp, kp = a->kp, blocks = a->pass_blocks, more = a->pass > 0;            \
    const float *z = a->z + (i64)xi * kp, *v = a->v + (i64)xi * cp;                           \
    float *m = a->m + (i64)xi * kp * cp;                                                      \
    for (int c0 = 0; c0 < cp;) {                                                              \
        const int left = (cp - c0) / L, kv = left < KV_MAX ? left : KV_MAX;                   \
        const float *vc = v + c0;                                                             \
        float *mc = m + c0;                                                                   \
        if (kv >= 4) wino_gradient_tiles_4_##ISA(z, vc, mc, blocks, cp, kp, more);            \
        else if (kv == 3) wino_gradient_tiles_3_##ISA(z, vc, mc, blocks, cp, kp, more);       \
        else if (kv == 2) wino_gradient_tiles_2_##ISA(z, vc, mc, blocks, cp, kp, more);       \
        else wino_gradient_tiles_1_##ISA(z, vc, mc, blocks, cp, kp, more);                    \
        c0 += kv * L;                                                                         \
    }                                                                                         \
}                                                                                             \
/* ... an output channel: dw[k] (c x r x r) = G^T m G. */                                     \
static TARGET void wino_gradient_filter_##ISA(void *job, int k)                               \
{                                                                                             \
    const struct wino_##ISA *a = job;                                                         \
    enum { L = sizeof(V) / sizeof(float) };                                                   \
    const int cp = a->cp, r = a->r, taps = r * r;                                             \
    const i64 step = (i64)a->kp * cp;                                                         \
    for (int c0 = 0; c0 < a->c; c0 += L) {                                                    \
        V rows[6][5];                                                                         \
        for (int ii = 0; ii < 6; ++ii) {                                                      \
            const float *m = a->m + (i64)6 * ii * step + (i64)k * cp + c0;                    \
            const V m0 = *(const V *)m, m1 = *(const V *)(m + step),                          \
                    m2 = *(const V *)(m + 2 * step), m3 = *(const V *)(m + 3 * step),         \
                    m4 = *(const V *)(m + 4 * step), m5 = *(const V *)(m + 5 * step);         \
            if (r == 3) WINO_FILTER_GRADIENT(rows[ii], m0, m1, m2, m3, m4, m5)                \
            else WINO_FILTER_GRADIENT5(rows[ii], m0, m1, m2, m3, m4, m5)                      \
        }                                                                                     \
        float values[25][L];                                                                  \
        for (int j = 0; j < r; ++j) {                                                         \
            V o[5];                                                                           \
            if (r == 3)                                                                       \
                WINO_FILTER_GRADIENT(o, rows[0][j], rows[1][j], rows[2][j], rows[3][j],       \
                                     rows[4][j], rows[5][j])                                  \
            else WINO_FILTER_GRADIENT5(o, rows[0][j], rows[1][j], rows[2][j], rows[3][j],     \
                                       rows[4][j], rows[5][j])                                \
            for (int i = 0; i < r; ++i) memcpy(values[r * i + j], &o[i], sizeof o[i]);        \
        }                                                                                     \
        float *out = a->dw + ((i64)k * a->c + c0) * taps;                                     \
        for (int l = 0; l < L && c0 + l < a->c; ++l)                                          \
            for (int e = 0; e < taps; ++e) out[l * taps + e] = values[e][l];                  \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* dw (k, c, r, r) = the gradient of the convolution of x (n, c, h, wd) padded by (ph, pw)    \
 * for the output gradient dy (n, k, oh, ow), written: G^T [sum over blocks of (A dY A^T) *   \
 * (B^T d B)] G, the adjoint of the forward's transforms. The blocks go in passes of `pass`   \
 * (their transforms made in chunks of `chunk`, then summed for each xi by one thread, in     \
 * order, added to the earlier passes' sums). The scratch (frames, a pass's v and z, m) is    \
 * the calling thread's. Returns 0, or 1 when it could not be allocated. */                   \
TARGET int winograd_backward_filter_f32_##ISA(                                                \
    const float *x, const float *dy, float *dw, int r, int n, int c, int h, int wd, int ph,   \
    int pw, int cp, int kp, int k, int oh, int ow, int pass, int chunk, int threads)          \
{                                                                                             \
    const int m = r == 3 ? 4 : 2, th = (oh + m - 1) / m, tw = (ow + m - 1) / m;               \
    struct wino_##ISA job = {                                                                 \
        .x = x, .dy = dy, .dw = dw, .n = n, .c = c, .h = h, .wd = wd, .ph = ph, .pw = pw,     \
        .cp = cp, .kp = kp, .k = k, .oh = oh, .ow = ow, .edge = m, .r = r, .th = th,          \
        .tw = tw, .hp = m * th + 6 - m, .wp = m * tw + 6 - m, .chunk = chunk,                 \
        .blocks = n * th * tw};                                                               \
    const size_t frame = (size_t)n * job.hp * job.wp * cp;                                    \
    const size_t gradient = (size_t)n * m * m * th * tw * kp;                                 \
    const size_t blocks = (size_t)(pass < job.blocks ? pass : job.blocks) * 36;               \
    float *memory = scratch_floats(&wino_frame_scratch, frame + gradient + blocks * (cp + kp) \
                                   + (size_t)36 * kp * cp);                                   \
    if (!memory) return 1;                                                                    \
    job.frame = memory;                                                                       \
    job.gradient = job.frame + frame;                                                         \
    job.v = job.gradient + gradient;                                                          \
    job.z = job.v + blocks * cp;                                                              \
    job.m = job.z + blocks * kp;                                                              \
    job.frame_bands = threads < 2 ? 1 : 2 * threads;                                          \
    pieces_run(wino_frame_band_##ISA, &job, job.frame_bands, threads);                        \
    pieces_run(wino_gradient_band_##ISA, &job, job.frame_bands, threads);                     \
    for (job.pass = 0; job.pass < job.blocks; job.pass += pass) {                             \
        job.pass_blocks = job.blocks - job.pass < pass ? job.blocks - job.pass : pass;        \
        pieces_run(wino_gradient_blocks_##ISA, &job, (job.pass_blocks + chunk - 1) / chunk,   \
                   threads);                                                                  \
        pieces_run(wino_gradient_sums_##ISA, &job, 36, threads);                              \
    }                                                                                         \
    pieces_run(wino_gradient_filter_##ISA, &job, k, threads);                                 \
    return 0;                                                                                 \
}

/* Tiles chosen by trying on AVX-512 (EPYC, 2 threads). */
DEFINE_WINOGRAD(vw32, vw32u, vwi32, 16, wide, WIDE, 4, 16, 12, 8, 6)
DEFINE_WINOGRAD(vf32, vf32u, vi32, 8, wide_half, WIDE, 4, 16, 12, 8, 6)
DEFINE_WINOGRAD(vf32, vf32u, vi32, 8, fast, FAST, 2, 12, 6, 4, 3)
DEFINE_WINOGRAD(vf32, vf32u, vi32, 8, baseline, BASELINE, 2, 12, 6, 4, 3)

/* -- col2im: a column matrix's window entries added back into the images ----------------------
 * cols holds rows (c, i, j) of (n, oh, ow) columns; dx (n, c, h, w) gets, for channels c0..c1-1,
 * the sum over window entries (in order i, j) of the entries that read each pixel: written. */
#define DEFINE_COL2IM(T, S)                                                                   \
void col2im_##S(const T *cols, T *dx, int n, int c, int c0, int c1, int h, int w, int kh,     \
                int kw, int oh, int ow, int sh, int sw, int ph, int pw, int dh, int dw)       \
{                                                                                             \
    for (int ch = c0; ch < c1; ++ch)                                                          \
        for (int img = 0; img < n; ++img) {                                                   \
            T *plane = dx + ((i64)img * c + ch) * h * w;                                      \
            memset(plane, 0, sizeof(T) * h * w);                                              \
            for (int i = 0; i < kh; ++i)                                                      \
                for (int j = 0; j < kw; ++j) {                                                \
                    const T *src = cols + (((i64)(ch * kh + i) * kw + j) * n + img) * oh * ow;\
                    /* outputs whose column ox*sw - pw + j*dw lies in 0..w-1 */               \
                    const int shift = j * dw - pw;                                            \
                    int lo = shift >= 0 ? 0 : (-shift + sw - 1) / sw;                         \
                    int hi = w - 1 - shift < 0 ? 0 : (w - 1 - shift) / sw + 1;                \
                    hi = hi < ow ? hi : ow;                                                   \
                    for (int oy = 0; oy < oh; ++oy) {                                         \
                        const int yy = oy * sh - ph + i * dh;                                 \
                        if (yy < 0 || yy >= h) continue;                                      \
                        T *row = plane + (i64)yy * w;                                         \
                        const T *in = src + (i64)oy * ow;                                     \
                        if (sw == 1)                                                          \
                            for (int ox = lo; ox < hi; ++ox) row[ox + shift] += in[ox];       \
                        else                                                                  \
                            for (int ox = lo; ox < hi; ++ox) row[ox * sw + shift] += in[ox];  \
                    }                                                                         \
                }                                                                             \
        }                                                                                     \
}

DEFINE_COL2IM(float, f32)
DEFINE_COL2IM(double, f64)

/* -- depthwise convolution: one input channel per group ---------------------------------------
 * Output channel mo reads input channel mo / mult, framed by conv_frame into a scratch plane
 * (sw * hf * q values) just before it is used, so that the frame stays in cache (one pass
 * over the images in memory); w is (M, K) with K = kh * kw window entries at offsets koff.
 * Forward: for a run of 4 vectors of outputs along a row (then single vectors, the last one
 * partial), the sum over k of w[mo][k] times the frame. Backward-filter: per output channel,
 * K vectors of partial sums over the outputs (a row's last partial vector of dy completed
 * with zeros, whose frame values are multiplied by zero: finite inputs assumed), their lanes
 * added last. Backward-data: each output gradient times each weight added into a
 * zero-padded plane (hp x wp; output (oy, ox) with entry (i, j) lands at row oy*sh + i*dh,
 * column ox*sw + j*dw), in order of output channel, entry, row, column; the image part is
 * then copied out. */
#define DEFINE_DEPTHWISE(T, S, V, VU, ISA, TARGET)                                            \
/* One output plane from its framed input plane: K entries at offsets koff, weights wk; each  \
 * output times a plus b, then max(., 0) with relu. A row's last partial vector is stored   \
 * whole where the values past the row's end lie before ``limit`` (outputs this call writes  \
 * later), else lane by lane. Inlined with K a constant 9 (3x3) too, whose weights and       \
 * offsets then stay in registers. */                                                        \
static inline __attribute__((always_inline)) TARGET void depthwise_plane_##S##_##ISA(       \
    const T *restrict plane, const i64 *restrict koff, const int K, const T *restrict wk,     \
    T *restrict out, const T *limit, int oh, int ow, int sh, int q, T a, T b, int affine,     \
    int relu)                                                                                 \
{                                                                                             \
    const int L = (int)(sizeof(V) / sizeof(T));                                               \
    for (int oy = 0; oy < oh; ++oy) {                                                         \
        const T *base = plane + (i64)oy * sh * q;                                             \
        T *row = out + (i64)oy * ow;                                                          \
        int ox = 0;                                                                           \
        for (; ox + 4 * L <= ow; ox += 4 * L) {                                               \
            V acc[4] = {{0}};                                                                 \
            for (int k = 0; k < K; ++k) {                                                     \
                const T *src = base + koff[k] + ox;                                           \
                for (int v = 0; v < 4; ++v) acc[v] += *(const VU *)(src + v * L) * wk[k];     \
            }                                                                                 \
            for (int v = 0; v < 4; ++v) {                                                     \
                if (affine) acc[v] = acc[v] * a + b;                                          \
                if (relu) VECTOR_RELU(acc[v]);                                                \
                *(VU *)(row + ox + v * L) = acc[v];                                           \
            }                                                                                 \
        }                                                                                     \
        for (; ox < ow; ox += L) {                                                            \
            V acc = {0};                                                                      \
            for (int k = 0; k < K; ++k) acc += *(const VU *)(base + koff[k] + ox) * wk[k];    \
            if (affine) acc = acc * a + b;                                                    \
            if (relu) VECTOR_RELU(acc);                                                       \
            if (ox + L <= ow || row + ox + L <= limit) {                                      \
                *(VU *)(row + ox) = acc;                                                      \
            } else {                                                                          \
                for (int l = 0; l < ow - ox; ++l) row[ox + l] = acc[l];                       \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
struct depthwise_##S##_##ISA {                                                                \
    const T *x; T *scratch; i64 plane_size; int h, wd, ph, pw, sw, hf; const i64 *koff;       \
    int K; const T *w; T *y; int c, mult, oh, ow, sh, q; const i64 *pieces;                   \
    const T *scale, *shift; int relu;                                                         \
};                                                                                            \
static TARGET void depthwise_piece_##S##_##ISA(void *job, int index)                          \
{                                                                                             \
    const struct depthwise_##S##_##ISA *a = job;                                              \
    const i64 *p = a->pieces + 4 * (i64)index;        /* images p0..p1-1, channels p2..p3-1 */ \
    const int m = a->c * a->mult, K = a->K, affine = a->scale || a->shift;                    \
    const i64 out_plane = (i64)a->oh * a->ow, in_plane = (i64)a->h * a->wd;                   \
    T *plane = a->scratch + index * a->plane_size;                                            \
    for (i64 img = p[0]; img < p[1]; ++img)                                                   \
        for (int mo = (int)p[2]; mo < p[3]; ++mo) {                                           \
            const T *image = a->x + (img * a->c + mo / a->mult) * in_plane;                   \
            if (img == p[0] && mo == p[2])     /* zeros once: every plane's values lie alike */ \
                conv_frame_##S(image, plane, 1, a->h, a->wd, a->ph, a->pw, a->sw, a->hf, a->q); \
            else if (mo == p[2] || mo % a->mult == 0)     /* the last frame serves the others */ \
                conv_frame_values_##S(image, plane, 1, a->h, a->wd, a->ph, a->pw, a->sw,      \
                                      a->hf, a->q);                                           \
            const T *wk = a->w + (i64)mo * K;                                                 \
            T *out = a->y + (img * m + mo) * out_plane;                                       \
            const T *limit = a->y + (img * m + p[3]) * out_plane;                             \
            const T scale = a->scale ? a->scale[mo] : 1, shift = a->shift ? a->shift[mo] : 0; \
            if (K == 9)                                                                       \
                depthwise_plane_##S##_##ISA(plane, a->koff, 9, wk, out, limit, a->oh, a->ow,  \
                                            a->sh, a->q, scale, shift, affine, a->relu);      \
            else                                                                              \
                depthwise_plane_##S##_##ISA(plane, a->koff, K, wk, out, limit, a->oh, a->ow,  \
                                            a->sh, a->q, scale, shift, affine, a->relu);      \
        }                                                                                     \
}                                                                                             \
/* Forward, pieces (p0, p1, m0, m1) on the workers, each with a scratch plane of its own     \
 * (plane_size values from scratch + index * plane_size). */                                  \
TARGET void depthwise_forward_##S##_##ISA(                                                    \
    const T *x, T *scratch, i64 plane_size, int h, int wd, int ph, int pw, int sw, int hf,    \
    const i64 *koff, int K, const T *w, T *y, int c, int mult, int oh, int ow, int sh, int q, \
    const i64 *pieces, int count, const T *scale, const T *shift, int relu, int threads)      \
{                                                                                             \
    struct depthwise_##S##_##ISA job = {x, scratch, plane_size, h, wd, ph, pw, sw, hf, koff,  \
                                        K, w, y, c, mult, oh, ow, sh, q, pieces, scale, shift, \
                                        relu};                                                \
    pieces_run(depthwise_piece_##S##_##ISA, &job, count, threads);                            \
}                                                                                             \
                                                                                              \
TARGET void depthwise_backward_filter_##S##_##ISA(                                     \
    const T *x, T *plane, int h, int wd, int ph, int pw, int sw, int hf, const i64 *koff,     \
    int K, const T *dy, T *dw, i64 images, int c, int mult, int m0, int m1, int oh, int ow,   \
    int sh, int q)                                                                            \
{                                                                                             \
    enum { MAX_K = 64 };                                                                      \
    const int L = (int)(sizeof(V) / sizeof(T));                                               \
    const int m = c * mult;                                                                   \
    for (int mo = m0; mo < m1; ++mo)                                                          \
        for (int k0 = 0; k0 < K; k0 += MAX_K) {                                               \
            const int kn = K - k0 < MAX_K ? K - k0 : MAX_K;                                   \
            V acc[MAX_K];                                                                     \
            for (int k = 0; k < kn; ++k) acc[k] = (V){0};                                     \
            for (i64 img = 0; img < images; ++img) {                                          \
                conv_frame_##S(x + (img * c + mo / mult) * h * wd, plane, 1, h, wd, ph, pw,   \
                               sw, hf, q);                                                    \
                const T *grads = dy + (img * m + mo) * oh * ow;                               \
                for (int oy = 0; oy < oh; ++oy) {                                             \
                    const T *base = plane + (i64)oy * sh * q;                                 \
                    const T *row = grads + (i64)oy * ow;                                      \
                    for (int ox = 0; ox < ow; ox += L) {                                      \
                        V g;                                                                  \
                        if (ox + L <= ow) {                                                   \
                            g = *(const VU *)(row + ox);                                      \
                        } else {          /* a partial vector: zeros past the row's end */    \
                            T lanes[sizeof(V) / sizeof(T)] = {0};                             \
                            memcpy(lanes, row + ox, sizeof(T) * (ow - ox));                   \
                            memcpy(&g, lanes, sizeof g);                                      \
                        }                                                                     \
                        for (int k = 0; k < kn; ++k)                                          \
                            acc[k] += g * *(const VU *)(base + koff[k0 + k] + ox);            \
                    }                                                                         \
                }                                                                             \
            }                                                                                 \
            for (int k = 0; k < kn; ++k) {                                                    \
                T total = 0;                                                                  \
                for (int l = 0; l < L; ++l) total += acc[k][l];                               \
                dw[(i64)mo * K + k0 + k] = total;                                             \
            }                                                                                 \
        }                                                                                     \
}                                                                                             \
                                                                                              \
TARGET void depthwise_backward_data_##S##_##ISA(                                       \
    const T *dy, const T *w, T *dx, T *padded, i64 images, int c, int mult, int c0, int c1,   \
    int h, int wd, int kh, int kw, int oh, int ow, int sh, int sw, int ph, int pw, int dh,    \
    int dw, int hp, int wp)                                                                   \
{                                                                                             \
    const int m = c * mult;                                                                   \
    for (i64 img = 0; img < images; ++img)                                                    \
        for (int ci = c0; ci < c1; ++ci) {                                                    \
            memset(padded, 0, sizeof(T) * hp * wp);                                           \
            for (int mo = ci * mult; mo < (ci + 1) * mult; ++mo) {                            \
                const T *grads = dy + (img * m + mo) * oh * ow;                               \
                for (int i = 0; i < kh; ++i)                                                  \
                    for (int j = 0; j < kw; ++j) {                                            \
                        const T weight = w[((i64)mo * kh + i) * kw + j];                      \
                        for (int oy = 0; oy < oh; ++oy) {                                     \
                            T *row = padded + (i64)(oy * sh + i * dh) * wp + j * dw;          \
                            const T *in = grads + (i64)oy * ow;                               \
                            if (sw == 1)                                                      \
                                for (int ox = 0; ox < ow; ++ox) row[ox] += weight * in[ox];   \
                            else                                                              \
                                for (int ox = 0; ox < ow; ++ox) row[ox * sw] += weight * in[ox]; \
                        }                                                                     \
                    }                                                                         \
            }                                                                                 \
            T *image = dx + (img * c + ci) * h * wd;                                          \
            for (int yy = 0; yy < h; ++yy)                                                    \
                memcpy(image + (i64)yy * wd, padded + (i64)(yy + ph) * wp + pw, sizeof(T) * wd); \
        }                                                                                     \
}

DEFINE_DEPTHWISE(float, f32, vf32, vf32u, fast, FAST)
DEFINE_DEPTHWISE(float, f32, vf32, vf32u, baseline, BASELINE)
DEFINE_DEPTHWISE(double, f64, vf64, vf64u, fast, FAST)
DEFINE_DEPTHWISE(double, f64, vf64, vf64u, baseline, BASELINE)

/* -- products with few rows: out = a @ w^T, w's rows contiguous (fully connected layers) -----
 * out[r][o] = sum over i of a[r][i] * w[o][i] for R rows of a (a handful: a batch), O rows of w
 * (the outputs) and I inner values: each w row is read once from memory for all rows of a
 * (a general product packs w first, which costs more than the product at a few rows). A tile
 * of 4 w rows x 2 a rows (RT) keeps 8 vectors of partial sums over i along the rows; a row's
 * lanes are then added in order, then its last I % L products: every output is summed the
 * same way whatever the pieces (bands of w's rows, on the workers). */
#define FEW_ROWS_TILE(T, V, VU, RT, OT)                                                       \
    {                                                                                         \
        V acc[RT][OT];                                                                        \
        for (int r = 0; r < RT; ++r)                                                          \
            for (int j = 0; j < OT; ++j) acc[r][j] = (V){0};                                  \
        int i = 0;                                                                            \
        for (; i + L <= inner; i += L) {                                                      \
            V wv[OT];                                                                         \
            for (int j = 0; j < OT; ++j) wv[j] = *(const VU *)(w + (o + j) * ldw + i);        \
            for (int r = 0; r < RT; ++r) {                                                    \
                const V av = *(const VU *)(a + (r0 + r) * lda + i);                           \
                for (int j = 0; j < OT; ++j) acc[r][j] += av * wv[j];                         \
            }                                                                                 \
        }                                                                                     \
        for (int r = 0; r < RT; ++r)                                                          \
            for (int j = 0; j < OT; ++j) {                                                    \
                T sum = 0;                                                                    \
                for (int l = 0; l < L; ++l) sum += acc[r][j][l];                              \
                for (int t = i; t < inner; ++t) sum += a[(r0 + r) * lda + t] * w[(o + j) * ldw + t]; \
                out[(r0 + r) * ldo + o + j] = sum;                                            \
            }                                                                                 \
    }

#define DEFINE_FEW_ROWS(T, S, V, VU, ISA, TARGET)                                             \
struct few_rows_##S##_##ISA {                                                                 \
    const T *a, *w; T *out; i64 lda, ldw, ldo; int rows, inner, outs, band;                   \
};                                                                                            \
static TARGET void few_rows_piece_##S##_##ISA(void *job, int index)                           \
{                                                                                             \
    const struct few_rows_##S##_##ISA *p = job;                                               \
    const T *a = p->a, *w = p->w;                                                             \
    T *out = p->out;                                                                          \
    const i64 lda = p->lda, ldw = p->ldw, ldo = p->ldo;                                       \
    const int L = (int)(sizeof(V) / sizeof(T)), rows = p->rows, inner = p->inner;             \
    const int o1 = (index + 1) * p->band < p->outs ? (index + 1) * p->band : p->outs;         \
    i64 o = (i64)index * p->band;                                                             \
    for (; o + 4 <= o1; o += 4) {                                                             \
        int r0 = 0;                                                                           \
        for (; r0 + 2 <= rows; r0 += 2) FEW_ROWS_TILE(T, V, VU, 2, 4)                         \
        if (r0 < rows) FEW_ROWS_TILE(T, V, VU, 1, 4)                                          \
    }                                                                                         \
    for (; o < o1; ++o) {                                                                     \
        int r0 = 0;                                                                           \
        for (; r0 + 2 <= rows; r0 += 2) FEW_ROWS_TILE(T, V, VU, 2, 1)                         \
        if (r0 < rows) FEW_ROWS_TILE(T, V, VU, 1, 1)                                          \
    }                                                                                         \
}                                                                                             \
TARGET void few_rows_product_##S##_##ISA(const T *a, i64 lda, const T *w, i64 ldw, T *out,   \
                                         i64 ldo, int rows, int inner, int outs, int band,    \
                                         int threads)                                         \
{                                                                                             \
    struct few_rows_##S##_##ISA job = {a, w, out, lda, ldw, ldo, rows, inner, outs, band};    \
    pieces_run(few_rows_piece_##S##_##ISA, &job, (outs + band - 1) / band, threads);          \
}

DEFINE_FEW_ROWS(float, f32, vf32, vf32u, fast, FAST)
DEFINE_FEW_ROWS(float, f32, vf32, vf32u, baseline, BASELINE)
DEFINE_FEW_ROWS(double, f64, vf64, vf64u, fast, FAST)
DEFINE_FEW_ROWS(double, f64, vf64, vf64u, baseline, BASELINE)

/* -- per-channel passes: BatchNorm with batch statistics (alone, or with the Scale and ReLU
 * after it), channel sums, ReLU's gradient ------------------------------------------------------
 * Arrays are (outer, dim, inner) with channel c the middle index; each function handles
 * channels c0..c1-1, whose values (outer runs of inner) are read once per pass while they are
 * still in cache. A sum over a run adds blocks of up to 64 vectors in T (four vectors side by
 * side) and each block's lanes into double lanes, in order; the lanes are added last: the
 * same result however the channels are shared out. */

/* ReLU's gradient: dx = dy * (x > 0 ? 1 : 0), for n values (dx may be dy); a product, not a
 * choice, so that NaN or inf in dy stays NaN where x <= 0, as in NumPy and Caffe. Written on
 * vectors (the compiler turns the scalar form into a branch). */
#define DEFINE_RELU_BACKWARD(T, S, V, VU, VI, ISA, TARGET)                                    \
static TARGET void relu_backward_##S##_##ISA(const T *dy, const T *x, T *dx, i64 n)          \
{                                                                                             \
    const int L = (int)(sizeof(V) / sizeof(T));                                               \
    const V zero = {0};                                                                       \
    i64 i = 0;                                                                                \
    for (; i + L <= n; i += L) {                                                              \
        const VI positive = -(*(const VU *)(x + i) > zero);                                   \
        *(VU *)(dx + i) = *(const VU *)(dy + i) * __builtin_convertvector(positive, V);       \
    }                                                                                         \
    for (; i < n; ++i) dx[i] = dy[i] * (T)(x[i] > 0);                                         \
}

DEFINE_RELU_BACKWARD(float, f32, vf32, vf32u, vi32, fast, FAST)
DEFINE_RELU_BACKWARD(float, f32, vf32, vf32u, vi32, baseline, BASELINE)
DEFINE_RELU_BACKWARD(double, f64, vf64, vf64u, vi64, fast, FAST)
DEFINE_RELU_BACKWARD(double, f64, vf64, vf64u, vi64, baseline, BASELINE)

#define CHANNEL_RUNS(c) for (i64 o = 0; o < outer; ++o) {                                     \
        const i64 at = (o * dim + (c)) * inner;

/* lanes[l] += the terms of a run of n values: TERM(i), a T expression of index i, and
 * TERM_V(VU, i), the vector of terms i .. i + L - 1 */
#define ADD_RUN(T, V, VU, TERM_V, TERM)                                                       \
    {                                                                                         \
        const int L = (int)(sizeof(V) / sizeof(T));                                           \
        i64 i = 0;                                                                            \
        while (i + 4 * L <= n) {                                                              \
            V p0 = {0}, p1 = {0}, p2 = {0}, p3 = {0};                                         \
            const i64 end = i + 64 * L <= n ? i + 64 * L : n - (n - i) % (4 * L);             \
            for (; i < end; i += 4 * L) {                                                     \
                p0 += TERM_V(VU, i);                                                              \
                p1 += TERM_V(VU, i + L);                                                          \
                p2 += TERM_V(VU, i + 2 * L);                                                      \
                p3 += TERM_V(VU, i + 3 * L);                                                      \
            }                                                                                 \
            const V block = (p0 + p1) + (p2 + p3);                                            \
            for (int l = 0; l < L; ++l) lanes[l] += (double)block[l];                         \
        }                                                                                     \
        for (; i < n; ++i) lanes[i % L] += (double)(TERM(i));                                 \
    }

static double lane_total(const double *lanes)
{
    double total = 0;
    for (int l = 0; l < 8; ++l) total += lanes[l];
    return total;
}

#define DEFINE_NORMALIZATION(T, S, SQRT, V, VU, ISA, TARGET)                                  \
static TARGET void add_run_##S##_##ISA(double *lanes, const T *a, const T *b, i64 n)          \
{                                                                                             \
    if (b) {                                                                                  \
        ADD_RUN(T, V, VU, PRODUCT_V, PRODUCT)                                                 \
    } else {                                                                                  \
        ADD_RUN(T, V, VU, VALUE_V, VALUE)                                                     \
    }                                                                                         \
}                                                                                             \
                                                                                              \
static TARGET void add_squares_##S##_##ISA(double *lanes, const T *a, T mu, i64 n)            \
{                                                                                             \
    ADD_RUN(T, V, VU, SQUARE_V, SQUARE)                                                       \
}                                                                                             \
                                                                                              \
/* mean = sum x / m, var = sum (x - mean)^2 / m (biased), inv = 1 / sqrt(var + eps) per      \
 * channel, m = outer * inner; xhat = (x - mean) * inv, kept in kept when not null, and       \
 * y = xhat * scale[c] + bias[c] (1 and 0 where null), then max(y, 0) when relu (NaN stays    \
 * NaN): BatchNorm, or BatchNorm, Scale and ReLU in one pass (y may be x). */                  \
static TARGET void batch_norm_forward_##S##_##ISA(                                            \
    const T *x, T *y, T *kept, T *mean, T *var, T *inv, const T *scale, const T *bias,        \
    i64 outer, int dim, i64 inner, int c0, int c1, int relu, T eps)                           \
{                                                                                             \
    const double m = (double)outer * inner;                                                   \
    for (int c = c0; c < c1; ++c) {                                                           \
        double lanes[8] = {0};                                                                \
        CHANNEL_RUNS(c) add_run_##S##_##ISA(lanes, x + at, 0, inner); }                       \
        const T mu = (T)(lane_total(lanes) / m);                                              \
        memset(lanes, 0, sizeof lanes);                                                       \
        CHANNEL_RUNS(c) add_squares_##S##_##ISA(lanes, x + at, mu, inner); }                  \
        const T sigma2 = (T)(lane_total(lanes) / m);                                          \
        const T factor = (T)1 / SQRT(sigma2 + eps);                                           \
        const T g = scale ? scale[c] : (T)1, b = bias ? bias[c] : (T)0;                       \
        CHANNEL_RUNS(c)                                                                       \
            for (i64 i = 0; i < inner; ++i) {                                                 \
                const T xhat = (x[at + i] - mu) * factor;                                     \
                if (kept) kept[at + i] = xhat;                                                \
                const T out = xhat * g + b;                                                   \
                y[at + i] = relu && out < 0 ? (T)0 : out;                                     \
            }                                                                                 \
        }                                                                                     \
        mean[c] = mu;                                                                         \
        var[c] = sigma2;                                                                      \
        inv[c] = factor;                                                                      \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* The gradient of batch_norm_forward: g = dy, or dy * (top > 0) when top (the chain's output \
 * after its ReLU) is not null; dx = (g - mean(g) - xhat * mean(g * xhat)) * inv * scale[c]    \
 * (scale 1 where null), and when sum_g is not null sum_g[c] = sum of g, sum_gx[c] = sum of   \
 * g * xhat (Scale's parameter gradients). dx may be dy (g is kept in dx meanwhile). */        \
static TARGET void batch_norm_backward_##S##_##ISA(                                           \
    const T *dy, const T *xhat, const T *inv, T *dx, const T *scale, const T *top, T *sum_g,  \
    T *sum_gx, i64 outer, int dim, i64 inner, int c0, int c1)                                 \
{                                                                                             \
    const double m = (double)outer * inner;                                                   \
    const T *g = top ? dx : dy;                                                               \
    for (int c = c0; c < c1; ++c) {                                                           \
        double g_lanes[8] = {0}, gx_lanes[8] = {0};                                           \
        CHANNEL_RUNS(c)                                                                       \
            if (top) relu_backward_##S##_##ISA(dy + at, top + at, dx + at, inner);            \
            add_run_##S##_##ISA(g_lanes, g + at, 0, inner);                                   \
            add_run_##S##_##ISA(gx_lanes, g + at, xhat + at, inner);                          \
        }                                                                                     \
        const double total_g = lane_total(g_lanes), total_gx = lane_total(gx_lanes);          \
        if (sum_g) {                                                                          \
            sum_g[c] = (T)total_g;                                                            \
            sum_gx[c] = (T)total_gx;                                                          \
        }                                                                                     \
        const T mean_g = (T)(total_g / m), mean_gx = (T)(total_gx / m);                       \
        const T factor = scale ? inv[c] * scale[c] : inv[c];                                  \
        CHANNEL_RUNS(c)                                                                       \
            for (i64 i = 0; i < inner; ++i)                                                   \
                dx[at + i] = (g[at + i] - mean_g - xhat[at + i] * mean_gx) * factor;          \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* Per channel c, each when its pointer is not null: sum_dy[c] = sum of dy, sum_dyx[c] = sum  \
 * of dy * x, and dx = dy * scale[c] (dx may be dy: the sums of a run are taken first). The   \
 * passes of Scale's and Bias's backward. */                                                  \
static TARGET void channel_pass_##S##_##ISA(const T *dy, const T *x, const T *scale, T *dx,   \
                                            T *sum_dy, T *sum_dyx, i64 outer, int dim,        \
                                            i64 inner, int c0, int c1)                        \
{                                                                                             \
    for (int c = c0; c < c1; ++c) {                                                           \
        double plain[8] = {0}, product[8] = {0};                                              \
        CHANNEL_RUNS(c)                                                                       \
            if (sum_dy) add_run_##S##_##ISA(plain, dy + at, 0, inner);                        \
            if (sum_dyx) add_run_##S##_##ISA(product, dy + at, x + at, inner);                \
            if (dx)                                                                           \
                for (i64 i = 0; i < inner; ++i) dx[at + i] = dy[at + i] * scale[c];           \
        }                                                                                     \
        if (sum_dy) sum_dy[c] = (T)lane_total(plain);                                         \
        if (sum_dyx) sum_dyx[c] = (T)lane_total(product);                                     \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* Scale's forward: y = x * scale[c] + bias[c] per channel (1 and 0 where null), then          \
 * max(y, 0) when relu (NaN stays NaN), after copying x into kept when not null (y may be x):  \
 * the Scale layer, and the per-channel affine and ReLU of a fused inference chain. */        \
static TARGET void scale_forward_##S##_##ISA(const T *x, const T *scale, const T *bias, T *y, \
                                             T *kept, i64 outer, int dim, i64 inner, int c0,  \
                                             int c1, int relu)                                \
{                                                                                             \
    for (int c = c0; c < c1; ++c) {                                                           \
        const T factor = scale ? scale[c] : (T)1, shift = bias ? bias[c] : (T)0;              \
        CHANNEL_RUNS(c)                                                                       \
            if (kept) memcpy(kept + at, x + at, sizeof(T) * inner);                           \
            for (i64 i = 0; i < inner; ++i) {                                                 \
                const T out = x[at + i] * factor + shift;                                     \
                y[at + i] = relu && out < 0 ? (T)0 : out;                                     \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
}

/* The terms of ADD_RUN: a value, a product of a and b, a squared difference from mu. */
#define VALUE_V(VU, i) (*(const VU *)(a + (i)))
#define VALUE(i) a[i]
#define PRODUCT_V(VU, i) (*(const VU *)(a + (i)) * *(const VU *)(b + (i)))
#define PRODUCT(i) (a[i] * b[i])
#define SQUARE_V(VU, i) ((*(const VU *)(a + (i)) - mu) * (*(const VU *)(a + (i)) - mu))
#define SQUARE(i) ((a[i] - mu) * (a[i] - mu))

DEFINE_NORMALIZATION(float, f32, sqrtf, vf32, vf32u, fast, FAST)
DEFINE_NORMALIZATION(float, f32, sqrtf, vf32, vf32u, baseline, BASELINE)
DEFINE_NORMALIZATION(double, f64, sqrt, vf64, vf64u, fast, FAST)
DEFINE_NORMALIZATION(double, f64, sqrt, vf64, vf64u, baseline, BASELINE)

/* One of the passes above over (outer, dim, inner) arrays, cut into `bands` bands run on the
 * pool's threads (a hand-off of microseconds, so that passes of a few hundred kilobytes are
 * shared too): bands of channels c0..c1-1, c0 = dim * band / bands, for kind
 * CHANNEL_BATCH_NORM_FORWARD, _BACKWARD, CHANNEL_PASS and CHANNEL_SCALE_FORWARD, each given
 * its pointers p in its own order; for CHANNEL_RELU_BACKWARD (p: dy, x, dx) bands of the
 * outer * dim * inner values, cut at multiples of 64. Cut by shape and each channel summed
 * by one band: the same results whatever the threads. */
enum { CHANNEL_BATCH_NORM_FORWARD, CHANNEL_BATCH_NORM_BACKWARD, CHANNEL_PASS,
       CHANNEL_SCALE_FORWARD, CHANNEL_RELU_BACKWARD };

#define DEFINE_CHANNEL_BANDS(T, S, ISA, TARGET)                                               \
struct channel_job_##S##_##ISA {                                                              \
    int kind;                                                                                 \
    void *p[8];                                                                               \
    i64 outer;                                                                                \
    int dim;                                                                                  \
    i64 inner;                                                                                \
    int relu, bands;                                                                          \
    T eps;                                                                                    \
};                                                                                            \
                                                                                              \
static TARGET void channel_band_##S##_##ISA(void *job, int band)                              \
{                                                                                             \
    const struct channel_job_##S##_##ISA *j = job;                                            \
    void *const *p = j->p;                                                                    \
    if (j->kind == CHANNEL_RELU_BACKWARD) {                                                   \
        const i64 n = j->outer * j->dim * j->inner;                                           \
        const i64 a = n * band / j->bands & ~(i64)63;                                         \
        const i64 b = band + 1 == j->bands ? n : n * (band + 1) / j->bands & ~(i64)63;        \
        relu_backward_##S##_##ISA((const T *)p[0] + a, (const T *)p[1] + a, (T *)p[2] + a,     \
                                  b - a);                                                     \
        return;                                                                               \
    }                                                                                         \
    const int c0 = (int)(j->dim * (i64)band / j->bands);                                      \
    const int c1 = (int)(j->dim * (i64)(band + 1) / j->bands);                                \
    switch (j->kind) {                                                                        \
    case CHANNEL_BATCH_NORM_FORWARD:                                                          \
        batch_norm_forward_##S##_##ISA(p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7],         \
                                       j->outer, j->dim, j->inner, c0, c1, j->relu, j->eps);  \
        break;                                                                                \
    case CHANNEL_BATCH_NORM_BACKWARD:                                                         \
        batch_norm_backward_##S##_##ISA(p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7],        \
                                        j->outer, j->dim, j->inner, c0, c1);                  \
        break;                                                                                \
    case CHANNEL_PASS:                                                                        \
        channel_pass_##S##_##ISA(p[0], p[1], p[2], p[3], p[4], p[5], j->outer, j->dim,         \
                                 j->inner, c0, c1);                                           \
        break;                                                                                \
    case CHANNEL_SCALE_FORWARD:                                                               \
        scale_forward_##S##_##ISA(p[0], p[1], p[2], p[3], p[4], j->outer, j->dim, j->inner,    \
                                  c0, c1, j->relu);                                           \
        break;                                                                                \
    }                                                                                         \
}                                                                                             \
                                                                                              \
TARGET void channel_bands_##S##_##ISA(int kind, void *p0, void *p1, void *p2, void *p3,       \
                                      void *p4, void *p5, void *p6, void *p7, i64 outer,      \
                                      int dim, i64 inner, int relu, double eps, int bands,    \
                                      int threads)                                            \
{                                                                                             \
    struct channel_job_##S##_##ISA job = {kind, {p0, p1, p2, p3, p4, p5, p6, p7}, outer, dim, \
                                          inner, relu, bands, (T)eps};                        \
    pieces_run(channel_band_##S##_##ISA, &job, bands, threads);                               \
}

DEFINE_CHANNEL_BANDS(float, f32, fast, FAST)
DEFINE_CHANNEL_BANDS(float, f32, baseline, BASELINE)
DEFINE_CHANNEL_BANDS(double, f64, fast, FAST)
DEFINE_CHANNEL_BANDS(double, f64, baseline, BASELINE)


/* -- LRN across channels ------------------------------------------------------------------------
 * s = shift + coeff * (sum of x^2 over channels ch - size/2 .. ch + size/2, inside the blob,
 * in channel order), y = x * s^-beta, for images of c channels of hw positions; scale and
 * power (both or neither) keep s and s^-beta for backward. With beta = 0.75 (the BVLC nets),
 * s^-0.75 is 1 / sqrt(s * sqrt(s)), which vectorizes; else pow. Positions go in blocks of 256
 * (a row of window sums in cache). Backward: dx = dy * power + factor * x * (the same window
 * sum of dy * x * power / scale), factor = -2 coeff beta, with scale and power the forward's;
 * each block of positions has its terms made first for every channel (ratio: scratch of
 * c * 256 values), so that a term is made once, not once per window holding it. */
#define DEFINE_LRN(T, S, SQRT, POW, ISA, TARGET)                                              \
TARGET void lrn_forward_##S##_##ISA(const T *x, T *y, T *scale, T *power, i64 images,  \
                                           int c, i64 hw, int size, T coeff, T shift, T beta) \
{                                                                                             \
    enum { BLOCK = 256 };                                                                     \
    const int half = size / 2, three_quarters = beta == (T)0.75;                              \
    T sums[BLOCK], factors[BLOCK];                                                            \
    for (i64 img = 0; img < images; ++img)                                                    \
        for (int ch = 0; ch < c; ++ch) {                                                      \
            const int c0 = ch - half > 0 ? ch - half : 0;                                     \
            const int c1 = ch + half < c - 1 ? ch + half : c - 1;                             \
            const T *first = x + img * c * hw;                                                \
            const i64 at = (img * c + ch) * hw;                                               \
            for (i64 p0 = 0; p0 < hw; p0 += BLOCK) {                                          \
                const int n = hw - p0 < BLOCK ? (int)(hw - p0) : BLOCK;                       \
                for (int p = 0; p < n; ++p) sums[p] = 0;                                      \
                for (int cc = c0; cc <= c1; ++cc) {                                           \
                    const T *in = first + (i64)cc * hw + p0;                                  \
                    for (int p = 0; p < n; ++p) sums[p] += in[p] * in[p];                     \
                }                                                                             \
                for (int p = 0; p < n; ++p) sums[p] = shift + coeff * sums[p];                \
                if (three_quarters) /* separate loops: a call to pow stops vectors */         \
                    for (int p = 0; p < n; ++p) factors[p] = (T)1 / SQRT(sums[p] * SQRT(sums[p])); \
                else                                                                          \
                    for (int p = 0; p < n; ++p) factors[p] = POW(sums[p], -beta);             \
                for (int p = 0; p < n; ++p) y[at + p0 + p] = x[at + p0 + p] * factors[p];     \
                if (scale) {                                                                  \
                    memcpy(scale + at + p0, sums, sizeof(T) * n);                             \
                    memcpy(power + at + p0, factors, sizeof(T) * n);                          \
                }                                                                             \
            }                                                                                 \
        }                                                                                     \
}                                                                                             \
                                                                                              \
TARGET void lrn_backward_##S##_##ISA(const T *x, const T *dy, const T *scale, const T *power, \
                                     T *dx, T *ratio, i64 images, int c, i64 hw, int size,    \
                                     T factor)                                                \
{                                                                                             \
    enum { BLOCK = 256 };                                                                     \
    const int half = size / 2;                                                                \
    for (i64 img = 0; img < images; ++img)                                                    \
        for (i64 p0 = 0; p0 < hw; p0 += BLOCK) {                                              \
            const int n = hw - p0 < BLOCK ? (int)(hw - p0) : BLOCK;                           \
            for (int ch = 0; ch < c; ++ch) {                                                  \
                const i64 at = (img * c + ch) * hw + p0;                                      \
                T *row = ratio + (i64)ch * BLOCK;                                             \
                for (int p = 0; p < n; ++p)                                                   \
                    row[p] = dy[at + p] * x[at + p] * power[at + p] / scale[at + p];          \
            }                                                                                 \
            for (int ch = 0; ch < c; ++ch) {                                                  \
                const int c0 = ch - half > 0 ? ch - half : 0;                                 \
                const int c1 = ch + half < c - 1 ? ch + half : c - 1;                         \
                const i64 at = (img * c + ch) * hw + p0;                                      \
                T sums[BLOCK];                                                                \
                for (int p = 0; p < n; ++p) sums[p] = ratio[(i64)c0 * BLOCK + p];             \
                for (int cc = c0 + 1; cc <= c1; ++cc)                                         \
                    for (int p = 0; p < n; ++p) sums[p] += ratio[(i64)cc * BLOCK + p];        \
                for (int p = 0; p < n; ++p)                                                   \
                    dx[at + p] = dy[at + p] * power[at + p] + factor * x[at + p] * sums[p];   \
            }                                                                                 \
        }                                                                                     \
}

DEFINE_LRN(float, f32, sqrtf, powf, fast, FAST)
DEFINE_LRN(float, f32, sqrtf, powf, baseline, BASELINE)
DEFINE_LRN(double, f64, sqrt, pow, fast, FAST)
DEFINE_LRN(double, f64, sqrt, pow, baseline, BASELINE)

/* -- SGD with momentum and L2 weight decay, one pass over the parameters ----------------------
 * Per element, in T, with the roundings of NumPy's separate passes over whole arrays (so
 * no multiply-add is contracted): g = diff + decay * data (when decayed), g = rate * g,
 * h = momentum * h + g; then diff = h (Caffe's update value) and data -= h. */
#define DEFINE_SGD_STEP(T, S)                                                                 \
__attribute__((optimize("fp-contract=off")))                                                  \
void sgd_step_##S(T *diff, T *data, T *history, i64 n, int decayed, T decay, T rate,         \
                  T momentum)                                                                 \
{                                                                                             \
    for (i64 i = 0; i < n; ++i) {                                                             \
        T g = diff[i];                                                                        \
        if (decayed) g = g + decay * data[i];                                                 \
        g = rate * g;                                                                         \
        const T h = momentum * history[i] + g;                                                \
        history[i] = h;                                                                       \
        diff[i] = h;                                                                          \
        data[i] = data[i] - h;                                                                \
    }                                                                                         \
}

DEFINE_SGD_STEP(float, f32)
DEFINE_SGD_STEP(double, f64)
