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
 * the low 4 bits of each index lane) looks up 16 rows' entries at once, and shifts by 4 h
 * give the other nibbles.  Per 4 weights of a plane: one lookup, one add and one shift
 * (16 rows per instruction); the scale is one fma per block.
 *
 * Order: plane, word, then the rows: the planes are read once, in their memory order
 * (sequential streams the hardware prefetches; a row-block order that walks K for 64 rows
 * at a time jumps N * 4 bytes every 256 bytes and ran 1.6-3x slower), the 8 tables of the
 * current word stay in registers (one token) or L1, and a block's partial sum that spans
 * words waits in a [M, N] buffer.  Columns at or past K read x = 0 (tables padded to whole
 * words), so the planes' padding bits add 0.
 *
 * Threads: chunks of 16-row vectors, claimed by an atomic counter, run by an OpenMP team
 * when built with -fopenmp (the process's runtime: torch's libgomp, already loaded, so the
 * team is the one torch's own ops have just used and whose threads are still spinning on
 * the other cores), else by a small pool of its own (below). */
#include <immintrin.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const float *tables;   /* [M, 8 Kw, 16]: one table per nibble of every word (zero past K) */
    int m;
    const int32_t *planes;
    int q, kw, n;
    const float *alpha;
    int kb, ngr, npb, group;
    float *acc;            /* [M, N]: a scale block's partial sum carried between words */
    float *y;              /* [M, N], zeroed: the output, accumulated over blocks and planes */
    int rb0, rb1;          /* 16-row vectors [rb0, rb1) */
} job_t;

static inline __attribute__((always_inline)) __m512 scale(const float *a, int n0, int gi, int amode,
                                                          __mmask16 msk, __m512i gidx) {
    if (amode == 0) return _mm512_maskz_loadu_ps(msk, a + n0);
    if (amode == 1) return _mm512_set1_ps(a[gi]); /* gi = n0 / group, kept by the caller */
    return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), msk, gidx, a, 4);
}

/* One word w of plane k for the rows of vectors [v0, v1), every token.  fm: bit h set where
 * nibble h closes a scale block (then one fma into y); la: the word's first block began in
 * an earlier word (its partial sum is read from acc); sa: the last block stays open (its
 * partial sum is written to acc).  amode 0: a scale per row, 1: per 16 rows or more,
 * 2: other groups (gathered).  All constant after inlining at the common call sites. */
static inline __attribute__((always_inline)) void word_pass(const job_t *j, int k, int w, int v0, int v1,
                                                            const int fm, const int la, const int sa,
                                                            const int amode, const int npb, const int m1) {
    const int n = j->n;
    const int32_t *p = j->planes + ((size_t)k * j->kw + w) * n;
    const float *ak = j->alpha + (size_t)k * j->kb * j->ngr;
    const int g0 = 8 * w;
    __m512 t1[8];
    if (m1)
        for (int h = 0; h < 8; h++) t1[h] = _mm512_loadu_ps(j->tables + (size_t)(g0 + h) * 16);
    int gi = amode == 1 ? 16 * v0 / j->group : 0, in_group = amode == 1 ? j->group - 16 * v0 % j->group : 0;
    for (int v = v0; v < v1; v++, in_group -= 16) {
        const int n0 = 16 * v;
        const int left = n - n0;
        if (amode == 1 && in_group == 0) {
            gi++;
            in_group = j->group;
        }
        const __mmask16 msk = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
        __m512i idx[8];
        /* ask for the same rows one word on (this chunk's next piece of the planes) and the
         * next block's scales: the hardware prefetcher stops at page ends and does not know
         * the chunk's stride; into L2, the distance being a whole row of the chunk */
        _mm_prefetch((const char *)(p + n + n0), _MM_HINT_T1);
        if (fm && amode == 0) _mm_prefetch((const char *)(ak + (size_t)((g0 + 7) / npb + 1) * j->ngr + n0), _MM_HINT_T1);
        idx[0] = _mm512_maskz_loadu_epi32(msk, p + n0);
        for (int h = 1; h < 8; h++) idx[h] = _mm512_srli_epi32(idx[0], 4 * h);
        __m512i gidx = _mm512_setzero_si512();
        if (amode == 2) {
            int32_t tmp[16];
            for (int i = 0; i < 16; i++) tmp[i] = n0 + i < n ? (n0 + i) / j->group : 0;
            gidx = _mm512_loadu_si512(tmp);
        }
        for (int m = 0; m < (m1 ? 1 : j->m); m++) {
            const float *tab = j->tables + ((size_t)m * j->kw * 8 + g0) * 16;
            float *accp = j->acc + (size_t)m * n + n0;
            float *yp = j->y + (size_t)m * n + n0;
            __m512 a = la ? _mm512_maskz_loadu_ps(msk, accp) : _mm512_setzero_ps();
            __m512 o = fm ? _mm512_maskz_loadu_ps(msk, yp) : _mm512_setzero_ps();
            for (int h = 0; h < 8; h++) {
                const __m512 t = m1 ? t1[h] : _mm512_loadu_ps(tab + 16 * h);
                a = _mm512_add_ps(a, _mm512_permutexvar_ps(idx[h], t));
                if ((fm >> h) & 1) {
                    o = _mm512_fmadd_ps(scale(ak + (size_t)((g0 + h) / npb) * j->ngr, n0, gi, amode, msk, gidx),
                                        a, o);
                    a = _mm512_setzero_ps();
                }
            }
            if (fm) _mm512_mask_storeu_ps(yp, msk, o);
            if (sa) _mm512_mask_storeu_ps(accp, msk, a);
        }
    }
}

#define PASS(FM, LA, SA, AM, NPB, M1) word_pass(j, k, w, j->rb0, j->rb1, FM, LA, SA, AM, NPB, M1)

static inline __attribute__((always_inline)) void run_words(const job_t *j, const int amode, const int m1) {
    const int npb = j->npb, last = 8 * j->kw - 1;
    for (int k = 0; k < j->q; k++) {
        for (int w = 0; w < j->kw; w++) {
            int fm = 0;
            for (int h = 0; h < 8; h++) {
                const int g = 8 * w + h, b = g / npb;
                if (b < j->kb && ((g + 1) % npb == 0 || g == last)) fm |= 1 << h;
            }
            const int la = (8 * w) % npb != 0;
            const int sa = !((fm >> 7) & 1);
            if (npb == 2 && fm == 0xAA && !la && !sa) PASS(0xAA, 0, 0, amode, 2, m1);
            else if (npb == 16 && fm == 0x80 && la && !sa) PASS(0x80, 1, 0, amode, 16, m1);
            else if (npb == 16 && fm == 0 && !la && sa) PASS(0, 0, 1, amode, 16, m1);
            else if (npb == 8 && fm == 0x80 && !la && !sa) PASS(0x80, 0, 0, amode, 8, m1);
            else PASS(fm, la, sa, amode, npb, m1);
        }
    }
}

static void run_job(const job_t *j) {
    const int am = j->group == 1 ? 0 : (j->group % 16 == 0 ? 1 : 2);
    const int m1 = j->m == 1;
    if (am == 0) { if (m1) run_words(j, 0, 1); else run_words(j, 0, 0); }
    else if (am == 1) { if (m1) run_words(j, 1, 1); else run_words(j, 1, 0); }
    else { if (m1) run_words(j, 2, 1); else run_words(j, 2, 0); }
}

/* The thread pool.  A call publishes its job under a new generation; the caller and up to
 * nthreads - 1 workers claim chunks of row blocks with a compare-and-swap on (generation,
 * next chunk), and the caller waits only for the chunks some worker has claimed.  A worker
 * that is not scheduled in time (a busy core) claims nothing and the caller does its share:
 * correctness never depends on the workers (nor does it after a fork, which has none). */
#define MAX_WORKERS 15
#ifndef SPIN
#define SPIN 2000 /* pauses a worker polls for the next call before it sleeps */
#endif
#ifndef CHUNKS_PER_THREAD
#define CHUNKS_PER_THREAD 4 /* row chunks per thread: balance against a late worker */
#endif

static pthread_mutex_t call_mu = PTHREAD_MUTEX_INITIALIZER; /* one pooled call at a time */
static pthread_mutex_t wake_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake_cv = PTHREAD_COND_INITIALIZER;
static int n_workers = 0;
static job_t pool_job;
static int pool_threads;
static _Atomic uint32_t pool_gen = 0;
static _Atomic uint64_t pool_next = 0; /* generation << 32 | chunks << 16 | next chunk */
static _Atomic int pool_done = 0;

/* Claims chunks of generation gen until none is left.  The chunk count travels in the same
 * atomic word as the generation and the next chunk, so a late worker can never pair one
 * call's count with another's counter; the job it copied is the one of gen whenever a claim
 * under gen succeeds. */
static void claim_chunks(uint32_t gen, const job_t *tmpl) {
    for (;;) {
        uint64_t s = atomic_load(&pool_next);
        const int next = (int)(s & 0xFFFF), nchunks = (int)((s >> 16) & 0xFFFF);
        if ((uint32_t)(s >> 32) != gen || next >= nchunks) return;
        if (!atomic_compare_exchange_weak(&pool_next, &s, s + 1)) continue;
        job_t j = *tmpl;
        const int nrb = tmpl->rb1;
        j.rb0 = (int)((long)nrb * next / nchunks);
        j.rb1 = (int)((long)nrb * (next + 1) / nchunks);
        run_job(&j);
        atomic_fetch_add(&pool_done, 1);
    }
}

static void *worker_main(void *arg) {
    const int index = (int)(intptr_t)arg;
    uint32_t seen = atomic_load(&pool_gen);
    for (;;) {
        uint32_t gen = atomic_load(&pool_gen);
        for (int spin = 0; gen == seen && spin < SPIN; spin++) {
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
        const int threads = pool_threads;
        if (index < threads - 1) claim_chunks(gen, &tmpl);
    }
    return NULL;
}

/* A forked child has no workers and may have inherited a lock held by one: start afresh. */
static int forked = 0; /* set in a forked child: its OpenMP runtime may wait for the parent's team */

static void pool_after_fork_child(void) {
    forked = 1;
    pthread_mutex_t fresh_mu = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t fresh_cv = PTHREAD_COND_INITIALIZER;
    call_mu = fresh_mu;
    wake_mu = fresh_mu;
    wake_cv = fresh_cv;
    n_workers = 0;
}

/* Registered when the library loads, so every child forked after that knows it is one. */
__attribute__((constructor)) static void register_atfork(void) { pthread_atfork(NULL, NULL, pool_after_fork_child); }

#ifdef _OPENMP
/* The OpenMP team of the calling thread claims the chunks one by one: a member that starts
 * late finds fewer left, so the call waits for it only to arrive at the region's end. */
static void run_team(const job_t *j, int nthreads, int nchunks) {
    _Atomic int next = 0;
    const int nrb = j->rb1;
#pragma omp parallel num_threads(nthreads)
    for (;;) {
        const int c = atomic_fetch_add(&next, 1);
        if (c >= nchunks) break;
        job_t jj = *j;
        jj.rb0 = (int)((long)nrb * c / nchunks);
        jj.rb1 = (int)((long)nrb * (c + 1) / nchunks);
        run_job(&jj);
    }
}
#endif

/* Which threading this build uses: 1 an OpenMP team, 0 the pool. */
int shiftadd_lut_threading(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
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
    pool_threads = nthreads;
    atomic_store(&pool_done, 0);
    atomic_store(&pool_next, (uint64_t)gen << 32 | (uint64_t)nchunks << 16);
    pthread_mutex_lock(&wake_mu);
    atomic_store(&pool_gen, gen);
    pthread_cond_broadcast(&wake_cv);
    pthread_mutex_unlock(&wake_mu);
    claim_chunks(gen, j);
    while (atomic_load(&pool_done) < nchunks) _mm_pause();
}

/* Tables of signed sums for each token and nibble: tables[m, g, j]. */
static void build_tables(const float *x, int m, int k, int ng4, float *tables) {
    /* ng4 here: 8 Kw, every nibble of every word (columns at or past K read 0) */
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
    const int ng4 = 8 * kw;
    const size_t tbytes = ((size_t)m * ng4 * 16 * sizeof(float) + 63) / 64 * 64;
    const size_t abytes = ((size_t)m * n * sizeof(float) + 63) / 64 * 64;
    float *tables = aligned_alloc(64, tbytes + abytes);
    if (!tables) return -1;
    float *acc = tables + tbytes / sizeof(float);
    build_tables(x, m, k, ng4, tables);
    memset(y, 0, (size_t)m * n * sizeof(float));
    const int nrb = (n + 15) / 16;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_WORKERS + 1) nthreads = MAX_WORKERS + 1;
    job_t j = {tables, m, planes, q, kw, n, alpha, kb, ngr, block_cols / 4, group_rows, acc, y, 0, nrb};
    const int nchunks = nrb < CHUNKS_PER_THREAD * nthreads ? nrb : CHUNKS_PER_THREAD * nthreads;
#ifdef _OPENMP
    /* each calling thread has a team of its own; a forked child (whose OpenMP runtime would
     * wait for the parent's team) runs the pool below */
    if (!forked) {
        if (nthreads == 1 || nrb == 1) run_job(&j);
        else run_team(&j, nthreads, nchunks);
        free(tables);
        return 0;
    }
#endif
    if (nthreads == 1 || nrb == 1 || pthread_mutex_trylock(&call_mu) != 0) {
        run_job(&j); /* one thread, or another call holds the pool: run here */
    } else {
        run_pooled(&j, nthreads, nchunks);
        pthread_mutex_unlock(&call_mu);
    }
    free(tables);
    return 0;
}

/* The scales alpha[i] = sum_t signs[t, i] 2^exps[t, i] (float32, summed in t order; the
 * power of two built from its exponent bits, as backends/triton/shiftadd.py's _pow2), for
 * the op's int8 scale terms [T, count]: one pass, no thread team. */
void shiftadd_alpha(const int8_t *exps, const int8_t *signs, int t, long count, float *out) {
    for (long i = 0; i < count; i++) {
        float acc = 0.0f;
        for (int u = 0; u < t; u++) {
            const uint32_t bits = (uint32_t)((int32_t)exps[(long)u * count + i] + 127) << 23;
            float p;
            memcpy(&p, &bits, sizeof p);
            const float term = (float)signs[(long)u * count + i] * p;
            acc = u == 0 ? term : acc + term;
        }
        out[i] = acc;
    }
}
