/* Lookup-table kernel for the packed shift-add linear (BCQ, mode 0) on x86 with AVX-512.
 *
 * Format (backends/triton/shiftadd.py): planes int32 [q, Kw, N], bit t of word w is input
 * column 32 w + t of output row n (1 means +1, 0 means -1); alpha float32 [q, Kb, Ng], one
 * scale per block_cols input columns and group_rows output rows.
 *
 *   y[m, n] = sum_k sum_b alpha[k, b, n / G] sum_{c in b} (2 bit_k[c, n] - 1) x[m, c]
 *
 * Per token and per 4 input columns (a nibble of a word) a 16-entry table holds the signed
 * sums T[j] = sum_{i<4} (bit i of j ? +x : -x)[4 g + i], so the inner sum of a block is a
 * sum of table entries indexed by the weight's own bits.  With N last in the planes, one
 * 512-bit load brings the words of 16 consecutive output rows; vpermps (which reads only
 * the low 4 bits of each index lane) looks up 16 rows' entries at once, and a shift by 4
 * moves to the next nibble.  Per 4 weights of a plane: one lookup, one add and one shift
 * (16 rows per instruction); the scale is one fma per block.
 *
 * Columns at or beyond K read x = 0 (tables padded), so the planes' padding bits add 0.
 * Threads: a small pool of its own (below) over chunks of RV * 16 rows.
 */
#include <immintrin.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef RV
#define RV 4 /* 16-row vectors per row block */
#endif
#define ROWS (RV * 16)

typedef struct {
    const float *tables;   /* [M, ng4, 16] */
    int m, ng4;
    const int32_t *planes;
    int q, kw, n;
    const float *alpha;
    int kb, ngr, npb, group;
    float *y;
    int rb0, rb1; /* row blocks [rb0, rb1) */
} job_t;

static inline __attribute__((always_inline)) __m512 scale(const float *a, int n0, int group, int amode,
                                                          __mmask16 msk, __m512i gidx) {
    if (amode == 0) return _mm512_maskz_loadu_ps(msk, a + n0);
    if (amode == 1) return _mm512_set1_ps(a[n0 / group]);
    return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), msk, gidx, a, 4);
}

/* One row block of ROWS output rows starting at n0, all tokens. npb: nibbles per scale
 * block; amode 0: one scale per row, 1: one per 16 rows or more (group % 16 == 0),
 * 2: other group sizes (gather). Both constant after inlining. */
static inline __attribute__((always_inline)) void row_block(const job_t *j, int n0, int npb, int amode) {
    __mmask16 msk[RV];
    __m512i gidx[RV];
    for (int r = 0; r < RV; r++) {
        int left = j->n - (n0 + 16 * r);
        msk[r] = left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
        if (amode == 2) {
            __m512i lane = _mm512_add_epi32(_mm512_set1_epi32(n0 + 16 * r),
                                            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
            int32_t tmp[16];
            _mm512_storeu_si512(tmp, lane);
            for (int i = 0; i < 16; i++) tmp[i] = tmp[i] < j->n ? tmp[i] / j->group : 0;
            gidx[r] = _mm512_loadu_si512(tmp);
        } else {
            gidx[r] = _mm512_setzero_si512();
        }
    }
    const int ng4 = j->ng4, n = j->n, kw = j->kw;
    const int full = ng4 / 8; /* words whose 8 nibbles are all inside K */
    for (int m = 0; m < j->m; m++) {
        const float *tab = j->tables + (size_t)m * ng4 * 16;
        __m512 out[RV];
        for (int r = 0; r < RV; r++) out[r] = _mm512_setzero_ps();
        for (int k = 0; k < j->q; k++) {
            const int32_t *p = j->planes + (size_t)k * kw * n + n0;
            const float *ak = j->alpha + (size_t)k * j->kb * j->ngr;
            __m512 acc[RV];
            for (int r = 0; r < RV; r++) acc[r] = _mm512_setzero_ps();
            for (int w = 0; w < full; w++) {
                __m512i wv[RV];
                for (int r = 0; r < RV; r++) wv[r] = _mm512_maskz_loadu_epi32(msk[r], p + (size_t)w * n + 16 * r);
#pragma GCC unroll 8
                for (int h = 0; h < 8; h++) {
                    const __m512 t = _mm512_loadu_ps(tab + (size_t)(8 * w + h) * 16);
                    for (int r = 0; r < RV; r++) {
                        acc[r] = _mm512_add_ps(acc[r], _mm512_permutexvar_ps(wv[r], t));
                        wv[r] = _mm512_srli_epi32(wv[r], 4);
                    }
                    const int g = 8 * w + h;
                    if ((g + 1) % npb == 0) {
                        const float *a = ak + (size_t)(g / npb) * j->ngr;
                        for (int r = 0; r < RV; r++) {
                            out[r] = _mm512_fmadd_ps(scale(a, n0 + 16 * r, j->group, amode, msk[r], gidx[r]),
                                                     acc[r], out[r]);
                            acc[r] = _mm512_setzero_ps();
                        }
                    }
                }
            }
            /* the last, partial word (K not a multiple of 32) and a partial last block */
            int pending = 0;
            if (full < kw && 8 * full < ng4) {
                __m512i wv[RV];
                for (int r = 0; r < RV; r++) wv[r] = _mm512_maskz_loadu_epi32(msk[r], p + (size_t)full * n + 16 * r);
                for (int g = 8 * full; g < ng4; g++) {
                    const __m512 t = _mm512_loadu_ps(tab + (size_t)g * 16);
                    for (int r = 0; r < RV; r++) {
                        acc[r] = _mm512_add_ps(acc[r], _mm512_permutexvar_ps(wv[r], t));
                        wv[r] = _mm512_srli_epi32(wv[r], 4);
                    }
                    pending = 1;
                    if ((g + 1) % npb == 0 || g == ng4 - 1) {
                        const float *a = ak + (size_t)(g / npb) * j->ngr;
                        for (int r = 0; r < RV; r++) {
                            out[r] = _mm512_fmadd_ps(scale(a, n0 + 16 * r, j->group, amode, msk[r], gidx[r]),
                                                     acc[r], out[r]);
                            acc[r] = _mm512_setzero_ps();
                        }
                        pending = 0;
                    }
                }
            } else if (ng4 % npb != 0) {
                pending = 1; /* K a multiple of 32 but not of block_cols: the last block is open */
            }
            if (pending) {
                const float *a = ak + (size_t)((ng4 - 1) / npb) * j->ngr;
                for (int r = 0; r < RV; r++)
                    out[r] = _mm512_fmadd_ps(scale(a, n0 + 16 * r, j->group, amode, msk[r], gidx[r]), acc[r], out[r]);
            }
        }
        for (int r = 0; r < RV; r++) _mm512_mask_storeu_ps(j->y + (size_t)m * n + n0 + 16 * r, msk[r], out[r]);
    }
}

#define RUN(NPB, AM) for (int b = j->rb0; b < j->rb1; b++) row_block(j, b * ROWS, NPB, AM)

static void run_job(const job_t *j) {
    const int am = j->group == 1 ? 0 : (j->group % 16 == 0 ? 1 : 2);
    switch (j->npb * 3 + am) {
    case 2 * 3 + 0: RUN(2, 0); break;
    case 2 * 3 + 1: RUN(2, 1); break;
    case 2 * 3 + 2: RUN(2, 2); break;
    case 16 * 3 + 0: RUN(16, 0); break;
    case 16 * 3 + 1: RUN(16, 1); break;
    case 16 * 3 + 2: RUN(16, 2); break;
    case 8 * 3 + 0: RUN(8, 0); break;
    case 8 * 3 + 1: RUN(8, 1); break;
    case 32 * 3 + 0: RUN(32, 0); break;
    case 32 * 3 + 1: RUN(32, 1); break;
    default: {
        const int npb = j->npb;
        if (am == 0) RUN(npb, 0); else if (am == 1) RUN(npb, 1); else RUN(npb, 2);
    }
    }
}

/* The thread pool.  A call publishes its job under a new generation; the caller and up to
 * nthreads - 1 workers claim chunks of row blocks with a compare-and-swap on (generation,
 * next chunk), and the caller waits only for the chunks some worker has claimed.  A worker
 * that is not scheduled in time (a busy core) claims nothing and the caller does its share:
 * correctness never depends on the workers (nor does it after a fork, which has none). */
#define MAX_WORKERS 15

static pthread_mutex_t call_mu = PTHREAD_MUTEX_INITIALIZER; /* one pooled call at a time */
static pthread_mutex_t wake_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake_cv = PTHREAD_COND_INITIALIZER;
static int n_workers = 0;
static job_t pool_job;
static int pool_chunks, pool_nrb, pool_threads;
static _Atomic uint32_t pool_gen = 0;
static _Atomic uint64_t pool_next = 0; /* generation << 32 | next chunk */
static _Atomic int pool_done = 0;

static void claim_chunks(uint32_t gen, const job_t *tmpl, int nchunks, int nrb) {
    for (;;) {
        uint64_t s = atomic_load(&pool_next);
        if ((uint32_t)(s >> 32) != gen || (int)(uint32_t)s >= nchunks) return;
        if (!atomic_compare_exchange_weak(&pool_next, &s, s + 1)) continue;
        const int c = (int)(uint32_t)s;
        job_t j = *tmpl;
        j.rb0 = (int)((long)nrb * c / nchunks);
        j.rb1 = (int)((long)nrb * (c + 1) / nchunks);
        run_job(&j);
        atomic_fetch_add(&pool_done, 1);
    }
}

static void *worker_main(void *arg) {
    const int index = (int)(intptr_t)arg;
    uint32_t seen = atomic_load(&pool_gen);
    for (;;) {
        uint32_t gen = atomic_load(&pool_gen);
        for (int spin = 0; gen == seen && spin < 20000; spin++) { /* tens of microseconds */
            _mm_pause();
            gen = atomic_load(&pool_gen);
        }
        if (gen == seen) {
            pthread_mutex_lock(&wake_mu);
            while ((gen = atomic_load(&pool_gen)) == seen) pthread_cond_wait(&wake_cv, &wake_mu);
            pthread_mutex_unlock(&wake_mu);
        }
        seen = gen;
        /* the job of generation gen: valid if a claim under gen succeeds (the caller does
         * not rewrite it before every chunk of gen is done) */
        const job_t tmpl = pool_job;
        const int nchunks = pool_chunks, nrb = pool_nrb, threads = pool_threads;
        if (index < threads - 1) claim_chunks(gen, &tmpl, nchunks, nrb);
    }
    return NULL;
}

static void run_pooled(const job_t *j, int nthreads, int nchunks) {
    while (n_workers < nthreads - 1) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int ok = pthread_create(&t, &attr, worker_main, (void *)(intptr_t)n_workers) == 0;
        pthread_attr_destroy(&attr);
        if (!ok) break;
        n_workers++;
    }
    const uint32_t gen = atomic_load(&pool_gen) + 1;
    pool_job = *j;
    pool_chunks = nchunks;
    pool_nrb = j->rb1;
    pool_threads = nthreads;
    atomic_store(&pool_done, 0);
    atomic_store(&pool_next, (uint64_t)gen << 32);
    pthread_mutex_lock(&wake_mu);
    atomic_store(&pool_gen, gen);
    pthread_cond_broadcast(&wake_cv);
    pthread_mutex_unlock(&wake_mu);
    claim_chunks(gen, j, nchunks, j->rb1);
    while (atomic_load(&pool_done) < nchunks) _mm_pause();
}

/* Tables of signed sums for each token and nibble: tables[m, g, j]. */
static void build_tables(const float *x, int m, int k, int ng4, float *tables) {
    /* lane j of sgn_i: +1 if bit i of j is set, else -1 */
    __m512 sgn[4];
    for (int i = 0; i < 4; i++) {
        float s[16];
        for (int jj = 0; jj < 16; jj++) s[jj] = (jj >> i) & 1 ? 1.0f : -1.0f;
        sgn[i] = _mm512_loadu_ps(s);
    }
    for (int t = 0; t < m; t++) {
        const float *xt = x + (size_t)t * k;
        float *tt = tables + (size_t)t * ng4 * 16;
        for (int g = 0; g < ng4; g++) {
            float v[4];
            for (int i = 0; i < 4; i++) v[i] = 4 * g + i < k ? xt[4 * g + i] : 0.0f;
            __m512 s = _mm512_mul_ps(sgn[0], _mm512_set1_ps(v[0]));
            s = _mm512_fmadd_ps(sgn[1], _mm512_set1_ps(v[1]), s);
            s = _mm512_fmadd_ps(sgn[2], _mm512_set1_ps(v[2]), s);
            s = _mm512_fmadd_ps(sgn[3], _mm512_set1_ps(v[3]), s);
            _mm512_storeu_ps(tt + (size_t)g * 16, s);
        }
    }
}

/* y[M, N] = x[M, K] @ W^T. Returns 0, or -1 if an argument is out of range or memory ran out. */
int shiftadd_lut_linear(const float *x, int m, int k, const int32_t *planes, int q, int kw, int n,
                        const float *alpha, int kb, int ngr, int block_cols, int group_rows, float *y,
                        int nthreads) {
    if (m < 1 || k < 1 || q < 1 || n < 1 || block_cols < 4 || block_cols % 4 || group_rows < 1) return -1;
    if (kw * 32 < k || (long)kb * block_cols < k || (long)ngr * group_rows < n) return -1;
    const int ng4 = (k + 3) / 4;
    float *tables = aligned_alloc(64, ((size_t)m * ng4 * 16 * sizeof(float) + 63) / 64 * 64);
    if (!tables) return -1;
    build_tables(x, m, k, ng4, tables);
    const int nrb = (n + ROWS - 1) / ROWS;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_WORKERS + 1) nthreads = MAX_WORKERS + 1;
    job_t j = {tables, m, ng4, planes, q, kw, n, alpha, kb, ngr, block_cols / 4, group_rows, y, 0, nrb};
    if (nthreads == 1 || nrb == 1 || pthread_mutex_trylock(&call_mu) != 0) {
        run_job(&j); /* one thread, or another call holds the pool: run here */
    } else {
        run_pooled(&j, nthreads, nrb < 8 * nthreads ? nrb : 8 * nthreads);
        pthread_mutex_unlock(&call_mu);
    }
    free(tables);
    return 0;
}
