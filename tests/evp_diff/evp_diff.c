/*
 * evp_diff: a differential tester for pipellm's libcrypto interposer.
 *
 * The interposer's contract: whatever a program does, its libcrypto results are byte-identical
 * with and without it. This program makes a random but seed-determined sequence of EVP calls
 * and prints one transcript line per call (its arguments in short form, its return value,
 * `outl` and an FNV-1a digest of every byte it wrote). Run once plainly and once with the
 * interposer loaded, the two transcripts must be identical.
 *
 * The sequence never depends on a call's result: every choice comes from the seed and from the
 * program's own model of what it did (which contexts and buffers exist, which cipher, key
 * length and IV length a context was given), so both runs make the same calls and the first
 * differing line is the first call whose answer differs. A call that fails is recorded and the
 * sequence goes on, as a program would. Keys, IVs and tags are often placed right before a
 * PROT_NONE page, with exactly the length OpenSSL reads: a library that reads more crashes, and
 * the crash is recorded in the transcript (`-> CRASH signal 11`) by a signal handler.
 *
 * Usage: evp_diff SEED STEPS [-x NAME,NAME...]
 *          a driver-like phase first (a context keyed once, counting IVs, sources cycled:
 *          the pattern the interposer serves from pre-encrypted chunks), then STEPS random
 *          operations with a re-keyed driver phase in the middle and maybe one more phase;
 *          random perturbations inside the phases. -x leaves out operations, perturbations or
 *          features by name (`evp_diff list` names them), to look past a known divergence.
 *        evp_diff scenario NAME
 *          a short fixed scenario (a regression test for one bug class).
 *        evp_diff list
 *          the scenario, perturbation and feature names.
 * Transcript lines: `#N OP ARGS -> rc=R outl=L h=DIGEST`, events (`#N map b3 ...`, `#N free
 * b3`, `#N write ...`, `#N phase ...`, `#N fork ...`, `#N fork-status exit=0`), lines of a
 * forked child prefixed `child: `. Under the interposer (pipellm_cc_* symbols present) the
 * program calls pipellm_cc_quiesce before most messages of a phase, so that chunks predicted
 * for them are ready (hits do not depend on the machine's speed); it prints the interposer's
 * counters to stderr (`evp-diff: stats k=v ...`), also when it crashes. Neither changes the
 * transcript, and without the interposer nothing waits.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

/* ---- OpenSSL 3's declarations, written out: only the runtime library is needed ---- */

typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;
typedef struct evp_cipher_st EVP_CIPHER;
typedef struct engine_st ENGINE;
typedef struct ossl_lib_ctx_st OSSL_LIB_CTX;
typedef struct ossl_param_st {
    const char *key;
    unsigned int data_type;
    void *data;
    size_t data_size;
    size_t return_size;
} OSSL_PARAM;
#define OSSL_PARAM_UNSIGNED_INTEGER 2
#define OSSL_PARAM_OCTET_STRING 5
#define OSSL_PARAM_UNMODIFIED ((size_t)-1)
#define EVP_CTRL_GCM_SET_IVLEN 0x9
#define EVP_CTRL_GCM_GET_TAG 0x10
#define EVP_CTRL_GCM_SET_TAG 0x11

EVP_CIPHER_CTX *EVP_CIPHER_CTX_new(void);
void EVP_CIPHER_CTX_free(EVP_CIPHER_CTX *);
int EVP_CIPHER_CTX_reset(EVP_CIPHER_CTX *);
int EVP_CIPHER_CTX_copy(EVP_CIPHER_CTX *, const EVP_CIPHER_CTX *);
int EVP_CIPHER_CTX_ctrl(EVP_CIPHER_CTX *, int, int, void *);
int EVP_CIPHER_CTX_get_params(EVP_CIPHER_CTX *, OSSL_PARAM[]);
int EVP_CIPHER_CTX_set_key_length(EVP_CIPHER_CTX *, int);
const EVP_CIPHER *EVP_aes_128_gcm(void);
const EVP_CIPHER *EVP_aes_192_gcm(void);
const EVP_CIPHER *EVP_aes_256_gcm(void);
const EVP_CIPHER *EVP_aes_256_ctr(void);
const EVP_CIPHER *EVP_aes_128_cbc(void);
const EVP_CIPHER *EVP_des_ede3_cbc(void);
EVP_CIPHER *EVP_CIPHER_fetch(OSSL_LIB_CTX *, const char *, const char *);
void EVP_CIPHER_free(EVP_CIPHER *);
typedef const unsigned char cuc;
int EVP_EncryptInit_ex(EVP_CIPHER_CTX *, const EVP_CIPHER *, ENGINE *, cuc *, cuc *);
int EVP_EncryptInit_ex2(EVP_CIPHER_CTX *, const EVP_CIPHER *, cuc *, cuc *, const OSSL_PARAM *);
int EVP_EncryptInit(EVP_CIPHER_CTX *, const EVP_CIPHER *, cuc *, cuc *);
int EVP_DecryptInit_ex(EVP_CIPHER_CTX *, const EVP_CIPHER *, ENGINE *, cuc *, cuc *);
int EVP_DecryptInit_ex2(EVP_CIPHER_CTX *, const EVP_CIPHER *, cuc *, cuc *, const OSSL_PARAM *);
int EVP_DecryptInit(EVP_CIPHER_CTX *, const EVP_CIPHER *, cuc *, cuc *);
int EVP_CipherInit_ex(EVP_CIPHER_CTX *, const EVP_CIPHER *, ENGINE *, cuc *, cuc *, int);
int EVP_CipherInit_ex2(EVP_CIPHER_CTX *, const EVP_CIPHER *, cuc *, cuc *, int, const OSSL_PARAM *);
int EVP_CipherInit(EVP_CIPHER_CTX *, const EVP_CIPHER *, cuc *, cuc *, int);
int EVP_EncryptUpdate(EVP_CIPHER_CTX *, unsigned char *, int *, cuc *, int);
int EVP_DecryptUpdate(EVP_CIPHER_CTX *, unsigned char *, int *, cuc *, int);
int EVP_CipherUpdate(EVP_CIPHER_CTX *, unsigned char *, int *, cuc *, int);
int EVP_EncryptFinal_ex(EVP_CIPHER_CTX *, unsigned char *, int *);
int EVP_EncryptFinal(EVP_CIPHER_CTX *, unsigned char *, int *);
int EVP_DecryptFinal_ex(EVP_CIPHER_CTX *, unsigned char *, int *);
int EVP_DecryptFinal(EVP_CIPHER_CTX *, unsigned char *, int *);
int EVP_CipherFinal_ex(EVP_CIPHER_CTX *, unsigned char *, int *);
int EVP_CipherFinal(EVP_CIPHER_CTX *, unsigned char *, int *);

/* ---- the interposer's own API, present only under it ---- */

static int (*cc_quiesce)(int);
static size_t (*cc_stats)(uint64_t *, size_t);
static const char *(*cc_stat_name)(size_t);

static void bind_cc(void) {
    cc_quiesce = (int (*)(int))dlsym(RTLD_DEFAULT, "pipellm_cc_quiesce");
    cc_stats = (size_t(*)(uint64_t *, size_t))dlsym(RTLD_DEFAULT, "pipellm_cc_stats");
    cc_stat_name = (const char *(*)(size_t))dlsym(RTLD_DEFAULT, "pipellm_cc_stat_name");
    fprintf(stderr, "evp-diff: interposer=%d quiesce=%d\n",
            dlsym(RTLD_DEFAULT, "pipellm_cc_active") != NULL, cc_quiesce != NULL);
}

static int in_child;

/* Waits until the interposer's workers have encrypted what they were given (a no-op without
 * it, and in a forked child, where no worker runs). */
static void quiesce(void) {
    if (cc_quiesce && !in_child) cc_quiesce(20000);
}

/* The interposer's counters on stderr (write(2) only, so that the crash handler can use it). */
static void print_cc_stats(const char *what) {
    if (!cc_stats || !cc_stat_name) return;
    uint64_t v[64];
    size_t n = cc_stats(v, 64);
    if (n > 64) n = 64;
    char line[4096];
    int k = snprintf(line, sizeof line, "evp-diff: %s", what);
    for (size_t i = 0; i < n && k < (int)sizeof line - 64; i++)
        k += snprintf(line + k, sizeof line - (size_t)k, " %s=%llu", cc_stat_name(i),
                      (unsigned long long)v[i]);
    line[k++] = '\n';
    if (write(2, line, (size_t)k) < 0) return;
}

/* ---- the transcript ---- */

static const char *prefix = "";
static unsigned long seq;
static char cur[1024];         /* the call in progress (for the crash handler) */
static volatile size_t curlen; /* 0: no call in progress */

static void vbegin(const char *fmt, va_list ap) {
    int n = snprintf(cur, sizeof cur, "%s#%lu ", prefix, seq++);
    vsnprintf(cur + n, sizeof cur - (size_t)n, fmt, ap);
    curlen = strlen(cur);
}

static void __attribute__((format(printf, 1, 2))) begin(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vbegin(fmt, ap);
    va_end(ap);
}

static void __attribute__((format(printf, 1, 2))) end(const char *fmt, ...) {
    char res[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(res, sizeof res, fmt, ap);
    va_end(ap);
    curlen = 0;
    printf("%s -> %s\n", cur, res);
}

static void __attribute__((format(printf, 1, 2))) event(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vbegin(fmt, ap);
    va_end(ap);
    curlen = 0;
    printf("%s\n", cur);
}

static void put_str(const char *s) {
    if (write(1, s, strlen(s)) < 0) return;
}

static void on_fatal(int sig) {
    alarm(5); /* whatever happens below, this process ends */
    char num[16];
    int n = 0, v = sig;
    do num[n++] = (char)('0' + v % 10), v /= 10;
    while (v);
    char rev[16];
    for (int i = 0; i < n; i++) rev[i] = num[n - 1 - i];
    rev[n] = 0;
    size_t len = curlen;
    if (len) {
        if (write(1, cur, len) < 0) return;
        put_str(" -> CRASH signal ");
    } else {
        put_str(prefix);
        put_str("CRASH outside any call, signal ");
    }
    put_str(rev);
    put_str("\n");
    if (!in_child) print_cc_stats("crash-stats");
    signal(sig, SIG_DFL);
    raise(sig);
}

static void install_crash_handler(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_fatal;
    sa.sa_flags = SA_RESETHAND | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    int sigs[] = {SIGSEGV, SIGBUS, SIGABRT, SIGILL, SIGFPE};
    for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++) sigaction(sigs[i], &sa, NULL);
}

/* ---- determinism: splitmix64, and a digest of what the library wrote ---- */

static uint64_t rs;
static uint64_t mix(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static uint64_t rnd(void) { return mix(&rs); }
static uint32_t below(uint32_t n) { return n ? (uint32_t)(rnd() % n) : 0; }
static int chance(int permille) { return below(1000) < (uint32_t)permille; }
static void fill_from(uint64_t *s, unsigned char *p, size_t n) {
    for (size_t i = 0; i < n; i += 8) {
        uint64_t v = mix(s);
        memcpy(p + i, &v, n - i < 8 ? n - i : 8);
    }
}
static void fill(unsigned char *p, size_t n) { fill_from(&rs, p, n); }

/* FNV-1a over 64-bit words (and the tail bytes), with a fold after each step. */
static unsigned long long fnv(const void *p, size_t n) {
    const unsigned char *b = p;
    uint64_t h = 0xcbf29ce484222325ull;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, b + i, 8);
        h = (h ^ w) * 0x100000001b3ull;
        h ^= h >> 32;
    }
    for (; i < n; i++) h = (h ^ b[i]) * 0x100000001b3ull;
    return (unsigned long long)(h ^ n);
}

/* ---- what can be left out (-x), by name ---- */

static const char *excluded_list = "";
static int off(const char *name) {
    size_t n = strlen(name);
    for (const char *p = excluded_list; (p = strstr(p, name)) != NULL; p += n)
        if ((p == excluded_list || p[-1] == ',') && (p[n] == 0 || p[n] == ',')) return 1;
    return 0;
}

/* ---- memory: guarded mappings (the data ends where a PROT_NONE page begins) ---- */

typedef struct {
    unsigned char *p, *base;
    size_t len, maplen;
    int heap;
} region;

static region map_guarded(size_t len) {
    region r = {0};
    size_t rounded = (len + 4095) & ~(size_t)4095;
    if (rounded == 0) rounded = 4096;
    r.maplen = rounded + 4096;
    r.base = mmap(NULL, r.maplen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (r.base == MAP_FAILED) {
        perror("mmap");
        exit(2);
    }
    if (mprotect(r.base + rounded, 4096, PROT_NONE) != 0) {
        perror("mprotect");
        exit(2);
    }
    r.p = r.base + rounded - len;
    r.len = len;
    return r;
}

static void unmap(region *r) {
    if (r->heap)
        free(r->p);
    else if (r->base)
        munmap(r->base, r->maplen);
    memset(r, 0, sizeof *r);
}

/* Key, IV, tag and parameter bytes: at the end of a page followed by a PROT_NONE page, or in
 * roomy memory. */
enum { G_KEY, G_IV, G_TAG, G_PAR, NGUARD };
static unsigned char *guard_page[NGUARD];
static unsigned char roomy[NGUARD][256];

static void setup_guards(void) {
    for (int i = 0; i < NGUARD; i++) guard_page[i] = map_guarded(4096).p;
}

static unsigned char *spot(int g, int at_guard, int n) {
    return at_guard ? guard_page[g] + 4096 - n : roomy[g] + 64;
}

static unsigned char *put(int g, int at_guard, const unsigned char *bytes, int n) {
    unsigned char *p = spot(g, at_guard, n);
    memcpy(p, bytes, (size_t)n);
    return p;
}

/* ---- ciphers ---- */

typedef struct {
    const char *name;
    const EVP_CIPHER *c;
    int keylen, ivlen, gcm;
} cipher_desc;

enum { AES256GCM, AES128GCM, AES192GCM, AES256CTR, AES128CBC, DES3CBC, AES256GCM_FETCHED, NCIPH };
static cipher_desc ciphers[NCIPH];
static EVP_CIPHER *fetched;

static void setup_ciphers(void) {
    fetched = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
    cipher_desc d[NCIPH] = {
        {"aes-256-gcm", EVP_aes_256_gcm(), 32, 12, 1},
        {"aes-128-gcm", EVP_aes_128_gcm(), 16, 12, 1},
        {"aes-192-gcm", EVP_aes_192_gcm(), 24, 12, 1},
        {"aes-256-ctr", EVP_aes_256_ctr(), 32, 16, 0},
        {"aes-128-cbc", EVP_aes_128_cbc(), 16, 16, 0},
        {"des-ede3-cbc", EVP_des_ede3_cbc(), 24, 8, 0},
        {"aes-256-gcm(fetched)", fetched, 32, 12, 1},
    };
    memcpy(ciphers, d, sizeof d);
}

static int pick_cipher(void) {
    uint32_t r = below(100);
    if (r < 55) return AES256GCM;
    if (r < 63) return AES256GCM_FETCHED;
    return AES128GCM + (int)below(5); /* the five others */
}

/* ---- the low-level calls, each printing its line ---- */

enum { V_ENC_EX, V_ENC_EX2, V_ENC, V_DEC_EX, V_DEC_EX2, V_DEC, V_CIPH_EX, V_CIPH_EX2, V_CIPH, NV };
static const char *const init_name[NV] = {
    "EncryptInit_ex", "EncryptInit_ex2", "EncryptInit", "DecryptInit_ex", "DecryptInit_ex2",
    "DecryptInit",    "CipherInit_ex",   "CipherInit_ex2", "CipherInit"};

static int variant_enc(int v, int enc) {
    if (v <= V_ENC) return 1;
    if (v <= V_DEC) return 0;
    return enc;
}

static int raw_init(int v, EVP_CIPHER_CTX *c, const EVP_CIPHER *ci, cuc *k, cuc *iv, int enc,
                    const OSSL_PARAM *prm) {
    switch (v) {
    case V_ENC_EX: return EVP_EncryptInit_ex(c, ci, NULL, k, iv);
    case V_ENC_EX2: return EVP_EncryptInit_ex2(c, ci, k, iv, prm);
    case V_ENC: return EVP_EncryptInit(c, ci, k, iv);
    case V_DEC_EX: return EVP_DecryptInit_ex(c, ci, NULL, k, iv);
    case V_DEC_EX2: return EVP_DecryptInit_ex2(c, ci, k, iv, prm);
    case V_DEC: return EVP_DecryptInit(c, ci, k, iv);
    case V_CIPH_EX: return EVP_CipherInit_ex(c, ci, NULL, k, iv, enc);
    case V_CIPH_EX2: return EVP_CipherInit_ex2(c, ci, k, iv, enc, prm);
    default: return EVP_CipherInit(c, ci, k, iv, enc);
    }
}

/* An init call. `klen`/`ivl`: the bytes placed (what OpenSSL reads); `pl`: an ivlen parameter
 * (ex2 variants), 0 for none. */
static int call_init(const char *cn, EVP_CIPHER_CTX *c, int v, int ci, const unsigned char *key,
                     const char *kname, int klen, int gk, const unsigned char *ivb, int ivl,
                     int giv, int enc, int pl) {
    cuc *k = key ? put(G_KEY, gk, key, klen) : NULL;
    cuc *iv = ivb ? put(G_IV, giv, ivb, ivl) : NULL;
    unsigned int plv = (unsigned int)pl;
    OSSL_PARAM prm[2] = {{"ivlen", OSSL_PARAM_UNSIGNED_INTEGER, &plv, sizeof plv,
                          OSSL_PARAM_UNMODIFIED},
                         {NULL, 0, NULL, 0, 0}};
    char kd[32] = "-", ivd[40] = "-", extra[40] = "";
    if (key) snprintf(kd, sizeof kd, "%s@%c%d", kname, gk ? 'g' : 'r', klen);
    if (ivb)
        snprintf(ivd, sizeof ivd, "%02x%02x%02x%02x..@%c%d", ivb[0], ivb[1], ivb[2], ivb[3],
                 giv ? 'g' : 'r', ivl);
    int n = 0;
    if (v >= V_CIPH_EX) n += snprintf(extra + n, sizeof extra - (size_t)n, " enc=%d", enc);
    if (v == V_ENC_EX2 || v == V_DEC_EX2 || v == V_CIPH_EX2)
        snprintf(extra + n, sizeof extra - (size_t)n, pl ? " params=ivlen:%d" : " params=NULL",
                 pl);
    begin("%s %s cipher=%s key=%s iv=%s%s", init_name[v], cn, ci < 0 ? "NULL" : ciphers[ci].name,
          kd, ivd, extra);
    int rc = raw_init(v, c, ci < 0 ? NULL : ciphers[ci].c, k, iv, enc, pl ? prm : NULL);
    end("rc=%d", rc);
    return rc;
}

enum { U_ENC, U_DEC, U_CIPH };
static const char *const update_name[3] = {"EncryptUpdate", "DecryptUpdate", "CipherUpdate"};

/* An Update; `room` bytes after out are digested (what a block cipher may write beyond inl). */
static int call_update(int kind, const char *cn, EVP_CIPHER_CTX *c, unsigned char *out,
                       const char *od, cuc *in, const char *id, int inl, int room,
                       int null_outl) {
    int outl = -77;
    begin("%s %s out=%s in=%s inl=%d%s", update_name[kind], cn, out ? od : "NULL", id, inl,
          null_outl ? " outl=NULL" : "");
    int *po = null_outl ? NULL : &outl;
    int rc = kind == U_ENC   ? EVP_EncryptUpdate(c, out, po, in, inl)
             : kind == U_DEC ? EVP_DecryptUpdate(c, out, po, in, inl)
                             : EVP_CipherUpdate(c, out, po, in, inl);
    if (out)
        end("rc=%d outl=%d h=%016llx", rc, outl, fnv(out, (size_t)inl + (size_t)room));
    else
        end("rc=%d outl=%d", rc, outl);
    return rc;
}

enum { F_ENC_EX, F_ENC, F_DEC_EX, F_DEC, F_CIPH_EX, F_CIPH, NF };
static const char *const final_name[NF] = {"EncryptFinal_ex", "EncryptFinal", "DecryptFinal_ex",
                                           "DecryptFinal",    "CipherFinal_ex", "CipherFinal"};

/* A Final into 32 bytes at out (all digested). */
static int call_final(int kind, const char *cn, EVP_CIPHER_CTX *c, unsigned char *out,
                      const char *od, int null_outl) {
    int outl = -77;
    int *po = null_outl ? NULL : &outl;
    begin("%s %s out=%s%s", final_name[kind], cn, od, null_outl ? " outl=NULL" : "");
    int rc;
    switch (kind) {
    case F_ENC_EX: rc = EVP_EncryptFinal_ex(c, out, po); break;
    case F_ENC: rc = EVP_EncryptFinal(c, out, po); break;
    case F_DEC_EX: rc = EVP_DecryptFinal_ex(c, out, po); break;
    case F_DEC: rc = EVP_DecryptFinal(c, out, po); break;
    case F_CIPH_EX: rc = EVP_CipherFinal_ex(c, out, po); break;
    default: rc = EVP_CipherFinal(c, out, po); break;
    }
    end("rc=%d outl=%d h=%016llx", rc, outl, fnv(out, 32));
    return rc;
}

/* GET_TAG of `len` bytes, into a buffer of exactly that length (before a guard page, or
 * roomy); the bytes (whatever the call left there) are copied to `keep` and digested. */
static int call_get_tag(const char *cn, EVP_CIPHER_CTX *c, int len, int g, unsigned char *keep) {
    unsigned char *dst = spot(G_TAG, g, len);
    memset(dst, 0xee, (size_t)len);
    begin("ctrl(GET_TAG,%d) %s tag@%c", len, cn, g ? 'g' : 'r');
    int rc = EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, len, dst);
    end("rc=%d h=%016llx", rc, fnv(dst, (size_t)len));
    if (keep) memcpy(keep, dst, (size_t)len);
    return rc;
}

static int call_set_tag(const char *cn, EVP_CIPHER_CTX *c, int len, const unsigned char *tag,
                        int g) {
    unsigned char *src = tag ? put(G_TAG, g, tag, len) : NULL;
    begin("ctrl(SET_TAG,%d) %s tag=%s", len, cn,
          tag ? (g ? "@g" : "@r") : "NULL");
    int rc = EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, len, src);
    end("rc=%d", rc);
    return rc;
}

static int call_set_ivlen(const char *cn, EVP_CIPHER_CTX *c, int n) {
    begin("ctrl(SET_IVLEN,%d) %s", n, cn);
    int rc = EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_IVLEN, n, NULL);
    end("rc=%d", rc);
    return rc;
}

/* EVP_CIPHER_CTX_get_params for the AEAD tag, `len` bytes (before a guard page or roomy). */
static int call_get_params(const char *cn, EVP_CIPHER_CTX *c, int len, int g) {
    unsigned char *dst = spot(G_PAR, g, len);
    memset(dst, 0xdd, (size_t)len);
    OSSL_PARAM p[2] = {{"tag", OSSL_PARAM_OCTET_STRING, dst, (size_t)len, OSSL_PARAM_UNMODIFIED},
                       {NULL, 0, NULL, 0, 0}};
    begin("get_params(tag,%d) %s", len, cn);
    int rc = EVP_CIPHER_CTX_get_params(c, p);
    end("rc=%d ret=%lld h=%016llx", rc,
        p[0].return_size == OSSL_PARAM_UNMODIFIED ? -1LL : (long long)p[0].return_size,
        fnv(dst, (size_t)len));
    return rc;
}

static int call_copy(const char *dn, EVP_CIPHER_CTX *dst, const char *sn, EVP_CIPHER_CTX *src) {
    begin("CTX_copy %s<-%s", dn, sn);
    int rc = EVP_CIPHER_CTX_copy(dst, src);
    end("rc=%d", rc);
    return rc;
}

static EVP_CIPHER_CTX *call_new(const char *cn) {
    begin("CTX_new %s", cn);
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    end("%s", c ? "ok" : "NULL");
    if (!c) exit(2);
    return c;
}

static void call_free(const char *cn, EVP_CIPHER_CTX *c) {
    begin("CTX_free %s", cn);
    EVP_CIPHER_CTX_free(c);
    end("done");
}

static int call_reset(const char *cn, EVP_CIPHER_CTX *c) {
    begin("CTX_reset %s", cn);
    int rc = EVP_CIPHER_CTX_reset(c);
    end("rc=%d", rc);
    return rc;
}

static int call_set_key_length(const char *cn, EVP_CIPHER_CTX *c, int n) {
    begin("CTX_set_key_length %s %d", cn, n);
    int rc = EVP_CIPHER_CTX_set_key_length(c, n);
    end("rc=%d", rc);
    return rc;
}

/* ---- fork: the child makes its calls on its copies and exits; the parent waits ---- */

/* Returns 1 in the child; in the parent, once the child is gone (its status recorded), 0. */
static int fork_begin(void) {
    fflush(stdout);
    fflush(stderr);
    pid_t p = fork();
    if (p < 0) {
        perror("fork");
        exit(2);
    }
    if (p == 0) {
        in_child = 1;
        prefix = "child: ";
        return 1;
    }
    int st = 0;
    while (waitpid(p, &st, 0) < 0 && errno == EINTR) {
    }
    if (WIFSIGNALED(st))
        event("fork-status signal=%d", WTERMSIG(st));
    else
        event("fork-status exit=%d", WEXITSTATUS(st));
    return 0;
}

static void child_exit(void) {
    fflush(stdout);
    _exit(0);
}

/* ==== random operations on a few contexts and buffers ==== */

#define NCTX 4
typedef struct {
    EVP_CIPHER_CTX *c;
    int cipher; /* -1: none (as far as this program knows, which is exactly) */
    int ivlen;  /* what OpenSSL reads for an IV now */
    int ivset;  /* GCM: an IV is set (else OpenSSL would encrypt under a random one) */
    int enc;    /* direction: 1, 0 */
    unsigned char tag[16];
    char name[4];
} cslot;
static cslot C[NCTX];

#define NBUF 6
static const size_t buf_cap[NBUF] = {4096, 16384, 65536, 65536, 262144, 1u << 20};
static region B[NBUF];
static int last_in = -1, last_out = -1;
static unsigned char keymat[4][32];
static const char *const key_name[4] = {"k0", "k1", "k2", "k3"};

static cslot *ctx_live(int s) {
    cslot *x = &C[s];
    if (!x->c) {
        x->c = call_new(x->name);
        x->cipher = -1;
        x->ivlen = 0;
        x->ivset = 0;
        x->enc = 0;
    }
    return x;
}

static region *buf_live(int i) {
    region *r = &B[i];
    if (!r->p) {
        if (chance(300)) {
            r->p = malloc(buf_cap[i]);
            if (!r->p) exit(2);
            r->len = buf_cap[i];
            r->heap = 1;
        } else {
            *r = map_guarded(buf_cap[i]);
        }
        fill(r->p, r->len);
        event("map b%d %s %zu", i, r->heap ? "heap" : "mmap", r->len);
    }
    return r;
}

static void buf_free(int i) {
    if (!B[i].p) return;
    event("free b%d", i);
    unmap(&B[i]);
}

/* Would OpenSSL encrypt under a random IV (GCM, none set)? Then an IV is set first. */
static int danger(const cslot *x) { return x->cipher >= 0 && ciphers[x->cipher].gcm && !x->ivset; }

/* An init on slot s with the model kept up to date. ci: cipher or -1; ki: key or -1. */
static void model_init(int s, int v, int ci, int ki, const unsigned char *iv, int enc, int pl) {
    cslot *x = ctx_live(s);
    int eff = ci >= 0 ? ci : x->cipher;
    if (eff < 0 || !ciphers[eff].gcm) pl = 0;
    int klen = eff >= 0 ? ciphers[eff].keylen : 1;
    int ivl = eff < 0 ? 1 : pl ? pl : ci >= 0 ? ciphers[ci].ivlen : x->ivlen;
    int gk = !off("guard") && chance(600), giv = !off("guard") && chance(600);
    call_init(x->name, x->c, v, ci, ki >= 0 ? keymat[ki] : NULL, ki >= 0 ? key_name[ki] : "",
              klen, gk, iv, ivl, giv, enc, pl);
    int e = variant_enc(v, enc);
    if (e != -1) x->enc = e;
    if (eff < 0) return; /* failed: no cipher */
    if (ci >= 0) {
        x->cipher = ci;
        x->ivlen = ciphers[ci].ivlen;
        x->ivset = 0;
    }
    if (pl) {
        if (pl != x->ivlen) x->ivset = 0;
        x->ivlen = pl;
    }
    if (iv) x->ivset = 1;
}

static int pick_init_variant(void) {
    static const int w[NV] = {30, 9, 7, 13, 5, 5, 16, 8, 7};
    int r = (int)below(100);
    for (int v = 0; v < NV; v++) {
        if (r < w[v]) return v;
        r -= w[v];
    }
    return V_ENC_EX;
}

static int pick_enc(void) {
    uint32_t r = below(100);
    return r < 50 ? 1 : r < 88 ? 0 : -1;
}

static void op_init(int s) {
    int v = pick_init_variant(), enc = pick_enc();
    cslot *x = ctx_live(s);
    unsigned char iv[16];
    fill(iv, sizeof iv);
    int ci = chance(400) ? -1 : pick_cipher();
    int ki = chance(350) ? -1 : (int)below(4);
    int has_iv = !chance(350);
    int eff = ci >= 0 ? ci : x->cipher;
    int pl = 0;
    if ((v == V_ENC_EX2 || v == V_DEC_EX2 || v == V_CIPH_EX2) && eff >= 0 && ciphers[eff].gcm &&
        chance(250)) {
        static const int lens[3] = {8, 12, 16};
        pl = lens[below(3)];
    }
    if (ci >= 0 && (ki >= 0 || has_iv) && chance(300)) {
        /* OpenSSL's two-step pattern: the cipher, then key and IV with a NULL cipher */
        model_init(s, v, ci, -1, NULL, enc, 0);
        model_init(s, v, -1, ki, has_iv ? iv : NULL, enc, pl);
        return;
    }
    model_init(s, v, ci, ki, has_iv ? iv : NULL, enc, pl);
}

/* The driver's per-message init (NULL cipher, NULL key, an IV), in one of its spellings. */
static void op_iv_init(int s) {
    unsigned char iv[16];
    fill(iv, sizeof iv);
    uint32_t r = below(100);
    int v = r < 60 ? V_ENC_EX : r < 70 ? V_ENC_EX2 : r < 85 ? V_CIPH_EX : r < 95 ? V_DEC_EX
                                                                                 : V_CIPH_EX2;
    int enc = v == V_CIPH_EX && chance(300) ? -1 : C[s].enc;
    model_init(s, v, -1, -1, iv, enc, 0);
}

static int pick_len(size_t cap) {
    uint32_t r = below(100);
    size_t n;
    if (r < 3)
        n = 0;
    else if (r < 13)
        n = 1 + below(15);
    else if (r < 38)
        n = 16 + below(241);
    else if (r < 68)
        n = 257 + below(3840);
    else if (r < 93)
        n = 4097 + below(61440);
    else
        n = 65537 + below(196608);
    if (n + 32 > cap) n = cap > 64 ? below((uint32_t)(cap - 32)) : 0;
    return (int)n;
}

static int update_kind(const cslot *x) {
    uint32_t r = below(100);
    int right = x->enc ? U_ENC : U_DEC, wrong = x->enc ? U_DEC : U_ENC;
    return r < 80 ? right : r < 92 ? U_CIPH : wrong;
}

static void op_update(int s) {
    cslot *x = ctx_live(s);
    if (danger(x)) {
        op_iv_init(s);
        return;
    }
    int kind = update_kind(x);
    int bi = (int)below(NBUF), bo = (int)below(NBUF - 1);
    if (bo >= bi) bo++;
    region *in = buf_live(bi);
    int inplace = !off("inplace") && chance(150);
    region *out = inplace ? in : buf_live(bo);
    size_t cap = in->len < out->len ? in->len : out->len;
    int len = pick_len(cap);
    size_t ioff = chance(250) && !inplace ? in->len - (size_t)len
                                          : below((uint32_t)(in->len - (size_t)len - 32 + 1));
    size_t ooff = inplace ? ioff : below((uint32_t)(out->len - (size_t)len - 32 + 1));
    int aad = x->cipher >= 0 && ciphers[x->cipher].gcm && chance(120);
    int pieces = chance(750) ? 1 : 2 + (int)below(3);
    int null_outl = chance(15);
    last_in = bi;
    last_out = inplace ? bi : bo;
    int at = 0;
    for (int p = 0; p < pieces; p++) {
        int n = p == pieces - 1 ? len - at : (int)below((uint32_t)(len - at + 1));
        char od[32], id[32];
        snprintf(id, sizeof id, "b%d+%zu", bi, ioff + (size_t)at);
        if (inplace)
            snprintf(od, sizeof od, "in");
        else
            snprintf(od, sizeof od, "b%d+%zu", bo, ooff + (size_t)at);
        unsigned char *o = aad ? NULL : out->p + ooff + (size_t)at;
        size_t room = out->len - ooff - (size_t)at - (size_t)n;
        call_update(kind, x->name, x->c, o, od, in->p + ioff + (size_t)at, id, n,
                    room < 16 ? (int)room : 16, null_outl);
        at += n;
    }
}

static void op_final(int s) {
    cslot *x = ctx_live(s);
    if (danger(x)) {
        op_iv_init(s);
        return;
    }
    uint32_t r = below(100);
    int kind;
    if (r < 60)
        kind = x->enc ? F_ENC_EX : F_DEC_EX;
    else if (r < 72)
        kind = x->enc ? F_ENC : F_DEC;
    else if (r < 86)
        kind = F_CIPH_EX;
    else if (r < 93)
        kind = F_CIPH;
    else
        kind = x->enc ? F_DEC_EX : F_ENC_EX;
    int bo = (int)below(NBUF);
    region *out = buf_live(bo);
    size_t o = below((uint32_t)(out->len - 32 + 1));
    char od[32];
    snprintf(od, sizeof od, "b%d+%zu", bo, o);
    call_final(kind, x->name, x->c, out->p + o, od, chance(15));
}

static int tag_len(void) { return chance(650) ? 16 : 4 + (int)below(12); }
static int at_guard(void) { return !off("guard") && chance(600); }

static void op_get_tag(int s) {
    cslot *x = ctx_live(s);
    int len = tag_len();
    call_get_tag(x->name, x->c, len, at_guard(), x->tag);
}

static void op_get_params_slot(int s) {
    cslot *x = ctx_live(s);
    call_get_params(x->name, x->c, tag_len(), at_guard());
}

static void op_set_tag(int s) {
    cslot *x = ctx_live(s);
    int len = tag_len();
    const unsigned char *t = chance(700) ? x->tag : C[below(NCTX)].tag;
    call_set_tag(x->name, x->c, len, chance(100) ? NULL : t, at_guard());
}

static void op_set_ivlen(int s) {
    cslot *x = ctx_live(s);
    static const int lens[4] = {8, 12, 12, 16};
    int n = lens[below(4)];
    call_set_ivlen(x->name, x->c, n);
    if (x->cipher >= 0 && ciphers[x->cipher].gcm) {
        if (n != x->ivlen) x->ivset = 0;
        x->ivlen = n;
    }
}

static void op_copy(int s) {
    int d = (int)below(NCTX - 1);
    if (d >= s) d++;
    cslot *x = ctx_live(s), *y = ctx_live(d);
    call_copy(y->name, y->c, x->name, x->c);
    if (x->cipher >= 0) {
        y->cipher = x->cipher;
        y->ivlen = x->ivlen;
        y->ivset = x->ivset;
        y->enc = x->enc;
    }
}

static void op_reset(int s) {
    cslot *x = ctx_live(s);
    call_reset(x->name, x->c);
    x->cipher = -1;
    x->ivset = 0;
    x->enc = 0;
}

static void op_free_ctx(int s) {
    if (!C[s].c) return;
    call_free(C[s].name, C[s].c);
    C[s].c = NULL;
}

static void op_free_buf(void) {
    if (off("free")) return;
    int i = chance(350) && last_in >= 0 ? last_in : chance(500) && last_out >= 0 ? last_out
                                                                                 : (int)below(NBUF);
    buf_free(i);
}

static void op_write_buf(void) {
    int i = chance(500) && last_in >= 0 ? last_in : (int)below(NBUF);
    region *r = buf_live(i);
    size_t n = 1 + below(chance(800) ? 512 : (uint32_t)(r->len / 4));
    size_t o = below((uint32_t)(r->len - n + 1));
    fill(r->p + o, n);
    event("write b%d+%zu n=%zu", i, o, n);
}

/* An H2D-like message and its D2H-like decryption: encrypt on one context, decrypt the result
 * with its tag on another (the tag check passes unless the ciphertext was tampered with). */
static void op_d2h(int s) {
    int d = (int)below(NCTX - 1);
    if (d >= s) d++;
    int ki = (int)below(4);
    unsigned char iv[12];
    fill(iv, sizeof iv);
    int bi = (int)below(NBUF), bc = (int)below(NBUF - 1);
    if (bc >= bi) bc++;
    region *in = buf_live(bi), *ct = buf_live(bc);
    size_t cap = in->len < ct->len ? in->len : ct->len;
    int len = pick_len(cap);
    if (len == 0) len = 1;
    size_t ioff = below((uint32_t)(in->len - (size_t)len + 1));
    size_t coff = below((uint32_t)(ct->len - (size_t)len - 16 + 1));
    model_init(s, V_ENC_EX, AES256GCM, ki, iv, 1, 0);
    cslot *x = &C[s];
    char id[32], od[32];
    snprintf(id, sizeof id, "b%d+%zu", bi, ioff);
    snprintf(od, sizeof od, "b%d+%zu", bc, coff);
    call_update(U_ENC, x->name, x->c, ct->p + coff, od, in->p + ioff, id, len, 0, 0);
    unsigned char fin[32];
    memset(fin, 0, sizeof fin);
    call_final(F_ENC_EX, x->name, x->c, fin, "fin", 0);
    call_get_tag(x->name, x->c, 16, at_guard(), x->tag);
    model_init(d, chance(700) ? V_DEC_EX : V_CIPH_EX, AES256GCM, ki, iv, 0, 0);
    cslot *y = &C[d];
    if (chance(100)) {
        ct->p[coff + below((uint32_t)len)] ^= 4;
        event("tamper b%d", bc);
    }
    int tag_first = chance(500);
    if (tag_first) call_set_tag(y->name, y->c, 16, x->tag, at_guard());
    region pt = map_guarded((size_t)len);
    memset(pt.p, 0x33, (size_t)len);
    call_update(U_DEC, y->name, y->c, pt.p, "pt", ct->p + coff, od, len, 0, 0);
    int freed = !off("free") && chance(250);
    if (freed) {
        event("free pt");
        unmap(&pt);
    }
    if (!tag_first) call_set_tag(y->name, y->c, 16, x->tag, at_guard());
    call_final(F_DEC_EX, y->name, y->c, fin, "fin", 0);
    if (!freed) unmap(&pt);
}

static void random_op(void);

static void op_fork(void) {
    if (in_child || off("fork")) return;
    int k = 1 + (int)below(4);
    event("fork child-ops=%d", k);
    if (fork_begin()) {
        for (int i = 0; i < k; i++) random_op();
        child_exit();
    }
    /* the parent goes on with the same operations (its generator did not move) */
}

static void random_op(void) {
    int s = (int)below(NCTX);
    int r = (int)below(1000);
    if ((r -= 200) < 0) return op_init(s);
    if ((r -= 60) < 0) return op_iv_init(s);
    if ((r -= 25) < 0) return op_set_ivlen(s);
    if ((r -= 265) < 0) return op_update(s);
    if ((r -= 90) < 0) return op_final(s);
    if ((r -= 70) < 0) return op_get_tag(s);
    if ((r -= 35) < 0) return op_set_tag(s);
    if ((r -= 30) < 0) return off("params") ? (void)0 : op_get_params_slot(s);
    if ((r -= 25) < 0) return off("copy") ? (void)0 : op_copy(s);
    if ((r -= 15) < 0) return op_reset(s);
    if ((r -= 15) < 0) return op_free_ctx(s);
    if ((r -= 10) < 0) {
        cslot *x = ctx_live(s);
        if (x->cipher >= 0) call_set_key_length(x->name, x->c, ciphers[x->cipher].keylen);
        return;
    }
    if ((r -= 30) < 0) return op_free_buf();
    if ((r -= 45) < 0) return op_write_buf();
    if ((r -= 20) < 0) return op_fork();
    if ((r -= 35) < 0) return off("d2h") ? (void)0 : op_d2h(s);
    op_update(s);
}

/* ==== driver-like phases ==== */

/* Perturbations, at most one per message (see run_phase for where each one acts). */
enum {
    P_NONE, P_FINAL2, P_FINAL_AFTER_TAG, P_TAG2, P_TAG_SHORT, P_PARAMS_BEFORE, P_PARAMS_AFTER,
    P_COPY_BEFORE_FINAL, P_COPY_BEFORE_TAG, P_COPY_AFTER_TAG, P_UPDATE_AGAIN, P_FORK_UF,
    P_FORK_FT, P_FORK_AFTER, P_MODIFY, P_MODIFY_INPLACE, P_INPLACE, P_FREE_OUT, P_FREE_SRC,
    P_AAD, P_SPLIT, P_EMPTY, P_REINIT_IV, P_NO_FINAL, P_SKIP, P_RENEW, P_RESET, P_IVLEN12,
    P_D2H, P_D2H_FREE, P_CIPHER_REINIT, P_CIPHER_IV_INIT, P_NULLCIPHER_KEY, P_SPELLING,
    P_ODD, NP
};
static const struct {
    const char *name, *group, *group2;
} pert[NP] = {
    {"none", "", ""},
    {"final-twice", "", ""},                    /* a second EncryptFinal_ex before GET_TAG */
    {"final-after-tag", "", ""},                /* EncryptFinal_ex again after GET_TAG */
    {"tag-twice", "", ""},                      /* GET_TAG, GET_TAG */
    {"tag-short", "", ""},                      /* GET_TAG of 4..15 bytes, then of 16 */
    {"params-before-tag", "params", ""},        /* get_params(tag) between Final and GET_TAG */
    {"params-after-tag", "params", ""},         /* get_params(tag) after GET_TAG */
    {"copy-before-final", "copy", ""},          /* copy after Update; Final + GET_TAG on both */
    {"copy-before-tag", "copy", ""},            /* copy after Final; GET_TAG on both */
    {"copy-after-tag", "copy", ""},             /* copy after GET_TAG; GET_TAG on the copy */
    {"update-after-tag", "", ""},               /* Update, Final, GET_TAG again, no new init */
    {"fork-update-final", "fork", ""},          /* fork after Update: the child finishes */
    {"fork-final-tag", "fork", ""},             /* fork after Final: the child gets the tag */
    {"fork-after-tag", "fork", ""},             /* fork after GET_TAG: the child goes on */
    {"modify-source", "", ""},                  /* source bytes change after pre-encryption */
    {"inplace-modified", "inplace", ""},        /* ... in its second half, then out == in */
    {"inplace", "inplace", ""},                 /* out == in */
    {"free-out", "free", ""},                   /* output unmapped after Update */
    {"free-src", "free", ""},                   /* source unmapped after Update (then back) */
    {"aad", "", ""},                            /* AAD before the data */
    {"split", "", ""},                          /* the data in two Updates */
    {"empty-update", "", ""},                   /* an Update of 0 bytes first */
    {"reinit-same-iv", "", ""},                 /* the IV init twice */
    {"no-final", "", ""},                       /* GET_TAG without Final */
    {"skip-chunk", "", ""},                     /* a chunk of the cycle left out */
    {"renew-ctx", "", ""},                      /* free the context, new one, init again */
    {"reset-ctx", "", ""},                      /* EVP_CIPHER_CTX_reset, init again */
    {"set-ivlen12", "", ""},                    /* SET_IVLEN 12 between init and Update */
    {"d2h", "d2h", ""},                         /* decrypt the message on a second context */
    {"d2h-free-out", "d2h", "free"},            /* ... its output unmapped before Final */
    {"cipher-reinit-nokey", "", ""},            /* EncryptInit_ex(cipher, no key) first */
    {"cipher-iv-init-nokey", "", ""},           /* the IV init with the cipher, no key */
    {"nullcipher-key", "", ""},                 /* the IV init with the key again */
    {"spelling", "", ""},                       /* other init, Update and Final variants */
    {"odd-call", "", ""},                       /* one unusual call somewhere in the message */
};

static int pert_off(int k) {
    return off(pert[k].name) || (pert[k].group[0] && off(pert[k].group)) ||
           (pert[k].group2[0] && off(pert[k].group2));
}

#define MAXMSG 400
#define MAXSRC 4
typedef struct {
    const char *label;
    int rekey;      /* the key (and cipher) at every init, as a re-keying driver would */
    int nmsg;       /* messages */
    int layout;     /* 0: LE32 message counter in bytes 0..4, 1: LE64 counter in bytes 4..12 */
    int quiesce_pm; /* permille of messages preceded by pipellm_cc_quiesce */
    int nsrc, meta; /* sources; meta: a small message after each source's transfer */
    size_t srclen[MAXSRC];
    unsigned char plan[MAXMSG];
} phase_cfg;

typedef struct {
    int s;
    size_t off;
    int len;
} chunk;

#define CHUNK_MAX (1u << 20)
#define SMALL MAXSRC /* the source index of the small messages */

static int build_cycle(const phase_cfg *cfg, chunk *cyc) {
    int nc = 0;
    for (int s = 0; s < cfg->nsrc; s++) {
        for (size_t o = 0; o < cfg->srclen[s]; o += CHUNK_MAX) {
            size_t n = cfg->srclen[s] - o < CHUNK_MAX ? cfg->srclen[s] - o : CHUNK_MAX;
            cyc[nc++] = (chunk){s, o, (int)n};
        }
        if (cfg->meta) cyc[nc++] = (chunk){SMALL, 0, s & 1 ? 1 : 64};
    }
    return nc;
}

static void next_iv(int layout, const unsigned char mask[12], uint64_t *ctr, unsigned char iv[12]) {
    memset(iv, 0, 12);
    if (layout == 0) {
        uint32_t m = (uint32_t)*ctr;
        memcpy(iv, &m, 4); /* little-endian host */
    } else {
        memcpy(iv + 4, ctr, 8);
    }
    for (int i = 0; i < 12; i++) iv[i] ^= mask[i];
    (*ctr)++;
}

static void regen(region *r, uint64_t seed) {
    uint64_t st = seed;
    fill_from(&st, r->p, r->len);
}

/* One unusual call on the phase's context (P_ODD); returns 1 if the driver's pattern must
 * start again with a full init (a call the interposer does not model). */
static const char *const odd_name[9] = {"odd-ivlen8",     "odd-ivlen16", "odd-keylen",
                                        "odd-settag",     "odd-decrypt", "odd-null-outl",
                                        "odd-null-final", "odd-params",  "odd-tag-short"};

static int odd_call(EVP_CIPHER_CTX *P, int o, unsigned char *bounce, cuc *src, const char *sd,
                    int len, const unsigned char *tag) {
    unsigned char fin[32];
    memset(fin, 0, sizeof fin);
    if (off(odd_name[o])) return 0;
    switch (o) {
    case 0: call_set_ivlen("P", P, 8); return 1;
    case 1: call_set_ivlen("P", P, 16); return 1;
    case 2: call_set_key_length("P", P, 32); return 1;
    case 3: call_set_tag("P", P, 16, tag, 1); return 1;
    case 4: call_update(U_DEC, "P", P, bounce, "bounce", src, sd, len, 0, 0); return 0;
    case 5: call_update(U_ENC, "P", P, bounce, "bounce", src, sd, len, 0, 1); return 0;
    case 6: call_final(F_ENC_EX, "P", P, fin, "fin", 1); return 0;
    case 7: call_get_params("P", P, 4 + (int)below(12), 1); return 0;
    default: call_get_tag("P", P, 4 + (int)below(12), 1, NULL); return 1;
    }
}

/* A phase in the CUDA driver's pattern: one AES-256-GCM context, keyed once with
 * EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, key, NULL) (or at every init if rekey),
 * then per message EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, iv) with a counting IV,
 * EncryptUpdate of the next chunk of the cycle into a bounce buffer, EncryptFinal_ex, GET_TAG;
 * plan[m] perturbs message m. */
static void run_phase(const phase_cfg *cfg) {
    region S[MAXSRC + 1];
    uint64_t seed[MAXSRC + 1];
    memset(S, 0, sizeof S);
    for (int s = 0; s < cfg->nsrc; s++) {
        S[s] = map_guarded(cfg->srclen[s]);
        seed[s] = rnd();
        regen(&S[s], seed[s]);
    }
    S[SMALL] = map_guarded(64);
    seed[SMALL] = rnd();
    regen(&S[SMALL], seed[SMALL]);
    chunk cyc[64];
    int nc = build_cycle(cfg, cyc);
    unsigned char key[32], mask[12], aad[48], tag[16], fin[32], iv[12];
    fill(key, sizeof key);
    fill(mask, sizeof mask);
    fill(aad, sizeof aad);
    memset(fin, 0, sizeof fin);
    uint64_t ctr = cfg->layout == 0 ? 1 : rnd() & 0xffffff;
    region bounce = map_guarded(CHUNK_MAX);
    event("phase %s rekey=%d msgs=%d layout=%s cycle=%d", cfg->label, cfg->rekey, cfg->nmsg,
          cfg->layout ? "chan64" : "msg32", nc);
    EVP_CIPHER_CTX *P = call_new("P"), *D = NULL, *Q = NULL;
    int need_full = !cfg->rekey;
    size_t ci = 0;
    for (int m = 0; m < cfg->nmsg; m++) {
        int k = cfg->plan[m];
        if (k == P_SKIP) ci++;
        chunk ch = cyc[ci++ % (size_t)nc];
        unsigned char *src = S[ch.s].p + ch.off;
        int len = ch.len;
        char sd[48], sd2[72];
        snprintf(sd, sizeof sd, "m%d:s%d+%zu", m, ch.s, ch.off);
        if (need_full) {
            call_init("P", P, V_ENC_EX, AES256GCM, key, "K", 32, 1, NULL, 0, 0, 1, 0);
            need_full = 0;
        }
        if (chance(cfg->quiesce_pm)) quiesce();
        if (k == P_MODIFY || k == P_MODIFY_INPLACE) {
            quiesce(); /* the chunk was pre-encrypted from the bytes before the change */
            size_t lo = k == P_MODIFY_INPLACE ? (size_t)len / 2 : 0;
            size_t n = 1 + below(256);
            if (n > (size_t)len - lo) n = (size_t)len - lo;
            size_t o = lo + below((uint32_t)((size_t)len - lo - n + 1));
            fill(src + o, n);
            event("write %s+%zu n=%zu", sd, o, n);
        }
        next_iv(cfg->layout, mask, &ctr, iv);
        /* P_SPELLING: the same message with other variants of the calls */
        static const int init_v[7] = {V_ENC_EX, V_ENC_EX2, V_ENC, V_CIPH_EX, V_CIPH_EX, V_CIPH_EX2,
                                      V_CIPH};
        static const int final_v[4] = {F_ENC_EX, F_ENC, F_CIPH_EX, F_CIPH};
        int iv_v = V_ENC_EX, enc = 1, up_v = U_ENC, fi_v = F_ENC_EX;
        if (k == P_SPELLING) {
            int j = (int)below(7);
            iv_v = init_v[j];
            enc = j == 4 ? -1 : 1;
            up_v = chance(500) ? U_CIPH : U_ENC;
            fi_v = final_v[below(4)];
        }
        int odd = (int)below(9), odd_at = k == P_ODD ? (int)below(4) : -1;
        if (k == P_CIPHER_REINIT)
            call_init("P", P, V_ENC_EX, AES256GCM, NULL, "", 0, 0, NULL, 0, 0, 1, 0);
        if (k == P_CIPHER_IV_INIT)
            call_init("P", P, V_ENC_EX, AES256GCM, NULL, "", 0, 0, iv, 12, 1, 1, 0);
        else if (cfg->rekey || k == P_NULLCIPHER_KEY)
            call_init("P", P, iv_v, cfg->rekey ? AES256GCM : -1, key, "K", 32, 1, iv, 12, 1, enc,
                      0);
        else
            call_init("P", P, iv_v, -1, NULL, "", 0, 0, iv, 12, 1, enc, 0);
        if (odd_at == 0) need_full |= odd_call(P, odd, bounce.p, src, sd, len, tag);
        if (k == P_REINIT_IV) call_init("P", P, V_ENC_EX, -1, NULL, "", 0, 0, iv, 12, 1, 1, 0);
        if (k == P_IVLEN12) call_set_ivlen("P", P, 12);
        if (k == P_EMPTY) call_update(U_ENC, "P", P, bounce.p, "bounce", src, sd, 0, 0, 0);
        if (k == P_AAD)
            call_update(U_ENC, "P", P, NULL, "", aad, "aad", 16 + (int)below(32), 0, 0);
        unsigned char *out = bounce.p;
        const char *od = "bounce";
        region tmp = {0};
        if (k == P_INPLACE || k == P_MODIFY_INPLACE) out = src, od = "in";
        if (k == P_FREE_OUT) {
            tmp = map_guarded((size_t)len);
            out = tmp.p, od = "tmp";
        }
        if (k == P_SPLIT) {
            int a = (int)below((uint32_t)len + 1);
            call_update(U_ENC, "P", P, out, od, src, sd, a, 0, 0);
            snprintf(sd2, sizeof sd2, "%s+%d", sd, a);
            call_update(U_ENC, "P", P, out + a, od, src + a, sd2, len - a, 0, 0);
        } else {
            call_update(up_v, "P", P, out, od, src, sd, len, 0, 0);
        }
        if (odd_at == 1) need_full |= odd_call(P, odd, bounce.p, src, sd, len, tag);
        if (k == P_FREE_OUT) {
            event("free tmp");
            unmap(&tmp);
        }
        if (k == P_FREE_SRC) {
            event("unmap s%d", ch.s);
            unmap(&S[ch.s]);
        }
        if (k == P_FORK_UF) {
            event("fork (child: Final, GET_TAG, get_params)");
            if (fork_begin()) {
                call_final(F_ENC_EX, "P", P, fin, "fin", 0);
                call_get_tag("P", P, 16, 1, NULL);
                call_get_params("P", P, 16, 1);
                child_exit();
            }
        }
        if (k == P_COPY_BEFORE_FINAL) {
            if (!Q) Q = call_new("Q");
            call_copy("Q", Q, "P", P);
            call_final(F_ENC_EX, "Q", Q, fin, "fin", 0);
            call_get_tag("Q", Q, 16, 1, NULL);
        }
        if (k != P_NO_FINAL) call_final(fi_v, "P", P, fin, "fin", 0);
        if (odd_at == 2) need_full |= odd_call(P, odd, bounce.p, src, sd, len, tag);
        if (k == P_FINAL2) call_final(F_ENC_EX, "P", P, fin, "fin", 0);
        if (k == P_PARAMS_BEFORE) call_get_params("P", P, 16, 1);
        if (k == P_COPY_BEFORE_TAG) {
            if (!Q) Q = call_new("Q");
            call_copy("Q", Q, "P", P);
            call_get_tag("Q", Q, 16, 1, NULL);
        }
        if (k == P_FORK_FT) {
            event("fork (child: GET_TAG)");
            if (fork_begin()) {
                call_get_tag("P", P, 16, 1, NULL);
                child_exit();
            }
        }
        if (k == P_TAG_SHORT) {
            call_get_tag("P", P, 4 + (int)below(12), 1, NULL);
            need_full = 1; /* a ctrl the interposer does not model: start the pattern again */
        }
        call_get_tag("P", P, 16, 1, tag);
        if (odd_at == 3) need_full |= odd_call(P, odd, bounce.p, src, sd, len, tag);
        if (k == P_TAG2) call_get_tag("P", P, 16, 1, NULL);
        if (k == P_FINAL_AFTER_TAG) call_final(F_ENC_EX, "P", P, fin, "fin", 0);
        if (k == P_PARAMS_AFTER) call_get_params("P", P, 16, 1);
        if (k == P_COPY_AFTER_TAG) {
            if (!Q) Q = call_new("Q");
            call_copy("Q", Q, "P", P);
            call_get_tag("Q", Q, 16, 1, NULL);
        }
        if (k == P_UPDATE_AGAIN) {
            call_update(U_ENC, "P", P, bounce.p, "bounce", src, sd, len, 0, 0);
            call_final(F_ENC_EX, "P", P, fin, "fin", 0);
            call_get_tag("P", P, 16, 1, NULL);
        }
        if (k == P_FORK_AFTER) {
            event("fork (child: GET_TAG, Update, Final, GET_TAG)");
            if (fork_begin()) {
                call_get_tag("P", P, 16, 1, NULL);
                call_update(U_ENC, "P", P, bounce.p, "bounce", src, sd, len, 0, 0);
                call_final(F_ENC_EX, "P", P, fin, "fin", 0);
                call_get_tag("P", P, 16, 1, NULL);
                child_exit();
            }
        }
        if (k == P_D2H || k == P_D2H_FREE) {
            if (!D) {
                D = call_new("D");
                if (!cfg->rekey)
                    call_init("D", D, V_DEC_EX, AES256GCM, key, "K", 32, 1, NULL, 0, 0, 0, 0);
            }
            if (cfg->rekey)
                call_init("D", D, V_DEC_EX, AES256GCM, key, "K", 32, 1, iv, 12, 1, 0, 0);
            else
                call_init("D", D, V_DEC_EX, -1, NULL, "", 0, 0, iv, 12, 1, 0, 0);
            call_set_tag("D", D, 16, tag, 1);
            region pt = map_guarded((size_t)len);
            call_update(U_DEC, "D", D, pt.p, "pt", out, od, len, 0, 0);
            if (k == P_D2H_FREE) {
                event("free pt");
                unmap(&pt);
            }
            call_final(F_DEC_EX, "D", D, fin, "fin", 0);
            unmap(&pt);
        }
        if (k == P_FREE_SRC) {
            S[ch.s] = map_guarded(ch.s == SMALL ? 64 : cfg->srclen[ch.s]);
            regen(&S[ch.s], seed[ch.s]);
            event("map s%d (same bytes)", ch.s);
        }
        if (k == P_RENEW) {
            call_free("P", P);
            P = call_new("P");
            need_full = 1;
        }
        if (k == P_RESET) {
            call_reset("P", P);
            need_full = 1;
        }
        if (k == P_CIPHER_REINIT || k == P_CIPHER_IV_INIT) need_full = 1;
    }
    call_free("P", P);
    if (D) call_free("D", D);
    if (Q) call_free("Q", Q);
    for (int s = 0; s <= SMALL; s++) unmap(&S[s]);
    unmap(&bounce);
    event("phase end");
}

static void random_phase(int rekey) {
    static phase_cfg cfg;
    memset(&cfg, 0, sizeof cfg);
    static const size_t sizes[] = {65536,  131072,  266240,  524288,
                                   786432, 1048576, 1572864, 2621440};
    cfg.label = rekey ? "rekeyed" : "keyed-once";
    cfg.rekey = rekey;
    cfg.nmsg = rekey ? 120 + (int)below(80) : 200 + (int)below(100);
    cfg.layout = (int)below(2);
    cfg.quiesce_pm = 850;
    cfg.nsrc = 1 + (int)below(3);
    cfg.meta = chance(500);
    for (int s = 0; s < cfg.nsrc; s++) cfg.srclen[s] = sizes[below(8)];
    chunk cyc[64];
    int nc = build_cycle(&cfg, cyc);
    int warm = 3 * nc + 6;
    if (warm > cfg.nmsg / 3) warm = cfg.nmsg / 3;
    for (int m = warm; m < cfg.nmsg; m++) {
        if (!chance(90)) continue;
        int k = 1 + (int)below(NP - 1);
        if (!pert_off(k)) cfg.plan[m] = (unsigned char)k;
    }
    run_phase(&cfg);
}

/* ==== the random run ==== */

static void cleanup(void) {
    for (int s = 0; s < NCTX; s++) op_free_ctx(s);
    for (int i = 0; i < NBUF; i++)
        if (B[i].p) unmap(&B[i]);
}

static void run_random(int steps) {
    int phases = !off("phases");
    int rekey_at = steps / 2, extra_at = (int)below((uint32_t)steps + 1);
    int extra = phases && chance(500) ? 1 + (int)below(2) : 0;
    if (phases) random_phase(0);
    for (int step = 0; step < steps; step++) {
        if (phases && step == rekey_at) random_phase(1);
        if (extra && step == extra_at) random_phase(extra == 2);
        random_op();
    }
    cleanup();
}

/* ==== fixed scenarios: one bug class each ==== */

/* A driver-like phase of nmsg messages (sources of 1 MiB and 512 KiB), pipellm_cc_quiesce
 * before every message, perturbation k at every `every`-th message from `from`. */
static void scenario_phase(const char *label, int k, int rekey, int nmsg, int from, int every,
                           size_t l0, size_t l1) {
    static phase_cfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.label = label;
    cfg.rekey = rekey;
    cfg.nmsg = nmsg;
    cfg.layout = 1;
    cfg.quiesce_pm = 1000;
    cfg.nsrc = 2;
    cfg.srclen[0] = l0;
    cfg.srclen[1] = l1;
    for (int m = from; k && m < nmsg; m += every) cfg.plan[m] = (unsigned char)k;
    run_phase(&cfg);
}

/* A context given `ci` by a first init, then key and IV with a NULL cipher (OpenSSL's
 * two-step pattern), both placed right before a guard page with the lengths OpenSSL reads,
 * then one message. */
static void scenario_two_step(int dec, int ci, int ivlen_ctrl) {
    EVP_CIPHER_CTX *c = call_new("c");
    int v = dec ? V_DEC_EX : V_ENC_EX;
    const cipher_desc *d = &ciphers[ci];
    unsigned char iv[16], in[64], out[96], fin[32], tag[16];
    fill(iv, sizeof iv);
    fill(in, sizeof in);
    memset(out, 0, sizeof out); /* digested whole: never uninitialised stack */
    memset(fin, 0, sizeof fin);
    if (ivlen_ctrl) {
        call_init("c", c, v, ci, keymat[0], "k0", d->keylen, 0, NULL, 0, 0, !dec, 0);
        call_set_ivlen("c", c, ivlen_ctrl);
        call_init("c", c, v, -1, NULL, "", 0, 0, iv, ivlen_ctrl, 1, !dec, 0);
    } else {
        call_init("c", c, v, ci, NULL, "", 0, 0, NULL, 0, 0, !dec, 0);
        call_init("c", c, v, -1, keymat[0], "k0", d->keylen, 1, iv, d->ivlen, 1, !dec, 0);
    }
    call_update(dec ? U_DEC : U_ENC, "c", c, out, "out", in, "in", 64, 16, 0);
    call_final(dec ? F_DEC_EX : F_ENC_EX, "c", c, fin, "fin", 0);
    if (d->gcm && !dec) call_get_tag("c", c, 16, 1, tag);
    call_free("c", c);
}

/* The first message under a key, its buffers unmapped after the Update (H2D), or the
 * decrypted output unmapped after DecryptUpdate (D2H). */
static void scenario_free(int d2h) {
    EVP_CIPHER_CTX *e = call_new("e");
    unsigned char iv[12], fin[32], tag[16];
    fill(iv, sizeof iv);
    memset(fin, 0, sizeof fin);
    region in = map_guarded(65536), ct = map_guarded(65536);
    fill(in.p, in.len);
    call_init("e", e, V_ENC_EX, AES256GCM, keymat[1], "k1", 32, 1, NULL, 0, 0, 1, 0);
    call_init("e", e, V_ENC_EX, -1, NULL, "", 0, 0, iv, 12, 1, 1, 0);
    call_update(U_ENC, "e", e, ct.p, "ct", in.p, "in", (int)in.len, 0, 0);
    if (!d2h) {
        event("free in, ct");
        unmap(&in);
        unmap(&ct);
    }
    call_final(F_ENC_EX, "e", e, fin, "fin", 0);
    call_get_tag("e", e, 16, 1, tag);
    if (d2h) {
        EVP_CIPHER_CTX *d = call_new("d");
        region pt = map_guarded(65536);
        call_init("d", d, V_DEC_EX, AES256GCM, keymat[1], "k1", 32, 1, NULL, 0, 0, 0, 0);
        call_init("d", d, V_DEC_EX, -1, NULL, "", 0, 0, iv, 12, 1, 0, 0);
        call_set_tag("d", d, 16, tag, 1);
        call_update(U_DEC, "d", d, pt.p, "pt", ct.p, "ct", (int)ct.len, 0, 0);
        event("free pt");
        unmap(&pt);
        call_final(F_DEC_EX, "d", d, fin, "fin", 0);
        call_free("d", d);
        unmap(&in);
        unmap(&ct);
    }
    call_free("e", e);
}

static const struct {
    const char *name, *what;
} scenarios[] = {
    {"null-cipher-key16", "1: aes-128-gcm, then key (16 bytes) + IV with a NULL cipher"},
    {"null-cipher-key24", "1: aes-192-gcm, then key (24 bytes) + IV with a NULL cipher"},
    {"null-cipher-3des", "1: des-ede3-cbc, then key (24) + IV (8) with a NULL cipher"},
    {"null-cipher-iv8", "1: aes-256-gcm, SET_IVLEN 8, then an 8-byte IV with a NULL cipher"},
    {"null-cipher-decrypt-key16", "1: as null-cipher-key16, decrypting"},
    {"free-after-update", "2: first message under a key, buffers unmapped after the Update"},
    {"free-after-d2h-update", "2: first D2H message, its output unmapped before DecryptFinal"},
    {"final-twice", "3: EncryptFinal_ex twice on served messages"},
    {"tag-twice", "3: GET_TAG twice on served messages"},
    {"params-after-tag", "3: get_params(tag) after GET_TAG on served messages"},
    {"params-before-tag", "3: get_params(tag) between Final and GET_TAG on served messages"},
    {"copy-after-tag", "3: EVP_CIPHER_CTX_copy after GET_TAG, GET_TAG on the copy"},
    {"fork-update-final", "3: a child forked between Update and Final finishes the message"},
    {"update-after-tag", "3: Update again after GET_TAG without a new init"},
    {"inplace-modified", "4: out == in, the source's second half changed after pre-encryption"},
    {"once", "6 (reference): the driver's pattern, keyed once"},
    {"rekey", "6: the same messages, the key passed at every init"},
    {"cipher-reinit-nokey", "new: EncryptInit_ex(ctx, aes-256-gcm, NULL, NULL, NULL) drops "
                            "the key in OpenSSL, a served message follows"},
    {"cipher-iv-init-nokey", "new: EncryptInit_ex(ctx, aes-256-gcm, NULL, NULL, iv)"},
    {"inplace-first", "new (cost): every message in place: the key is never confirmed"},
};

static int scenario_pert(const char *name) {
    for (int k = 1; k < NP; k++)
        if (strcmp(pert[k].name, name) == 0) return k;
    return 0;
}

static int run_scenario(const char *name) {
    event("scenario %s", name);
    if (strcmp(name, "null-cipher-key16") == 0) scenario_two_step(0, AES128GCM, 0);
    else if (strcmp(name, "null-cipher-key24") == 0) scenario_two_step(0, AES192GCM, 0);
    else if (strcmp(name, "null-cipher-3des") == 0) scenario_two_step(0, DES3CBC, 0);
    else if (strcmp(name, "null-cipher-iv8") == 0) scenario_two_step(0, AES256GCM, 8);
    else if (strcmp(name, "null-cipher-decrypt-key16") == 0) scenario_two_step(1, AES128GCM, 0);
    else if (strcmp(name, "free-after-update") == 0) scenario_free(0);
    else if (strcmp(name, "free-after-d2h-update") == 0) scenario_free(1);
    else if (strcmp(name, "inplace-modified") == 0)
        scenario_phase(name, P_MODIFY_INPLACE, 0, 100, 30, 10, CHUNK_MAX, CHUNK_MAX);
    else if (strcmp(name, "once") == 0 || strcmp(name, "rekey") == 0)
        scenario_phase(name, 0, name[0] == 'r', 160, 0, 1, CHUNK_MAX, CHUNK_MAX / 2);
    else if (strcmp(name, "inplace-first") == 0)
        scenario_phase(name, P_INPLACE, 0, 120, 0, 1, CHUNK_MAX, CHUNK_MAX / 2);
    else if (scenario_pert(name))
        scenario_phase(name, scenario_pert(name), 0, 160, 40, 8, CHUNK_MAX, CHUNK_MAX / 2);
    else {
        fprintf(stderr, "unknown scenario %s (see: evp_diff list)\n", name);
        return 1;
    }
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 1 << 16);
    install_crash_handler();
    for (int i = 0; i < NCTX; i++) snprintf(C[i].name, sizeof C[i].name, "c%d", i);
    if (argc >= 2 && strcmp(argv[1], "list") == 0) {
        for (size_t i = 0; i < sizeof scenarios / sizeof scenarios[0]; i++)
            printf("scenario %s: class %s\n", scenarios[i].name, scenarios[i].what);
        for (int k = 1; k < NP; k++)
            printf("perturbation %s %s %s\n", pert[k].name, pert[k].group, pert[k].group2);
        printf("feature guard fork free inplace copy params d2h phases\n");
        for (int o = 0; o < 9; o++) printf("odd-call %s\n", odd_name[o]);
        return 0;
    }
    if (argc < 3) {
        fprintf(stderr, "usage: %s SEED STEPS [-x NAME,...] | scenario NAME | list\n", argv[0]);
        return 1;
    }
    bind_cc();
    setup_guards();
    setup_ciphers();
    int rc = 0;
    if (strcmp(argv[1], "scenario") == 0) {
        rs = 0x5eed;
        fill(&keymat[0][0], sizeof keymat);
        rc = run_scenario(argv[2]);
    } else {
        rs = strtoull(argv[1], NULL, 0);
        int steps = atoi(argv[2]);
        if (argc >= 5 && strcmp(argv[3], "-x") == 0) excluded_list = argv[4];
        fill(&keymat[0][0], sizeof keymat);
        event("seed %s steps %d exclude %s", argv[1], steps, excluded_list[0] ? excluded_list : "-");
        run_random(steps);
    }
    if (fetched) EVP_CIPHER_free(fetched);
    event("end");
    fflush(stdout);
    print_cc_stats("stats");
    return rc;
}
