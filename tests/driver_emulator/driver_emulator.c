/*
 * A stand-in for the CUDA driver's use of OpenSSL in confidential-computing mode, for testing
 * pipellm's libcrypto interposer on machines without CC hardware.
 *
 * It reaches libcrypto the two ways a driver can:
 *   link    symbols bound at load time (this program links libcrypto.so.3);
 *   dlopen  dlopen("libcrypto.so.3") + dlsym, as libcuda does;
 * and calls it in the driver's pattern: one EVP context per channel, AES-256-GCM, a fresh IV
 * per chunk of at most 1 MiB set with EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, iv), one
 * EVP_EncryptUpdate into a bounce buffer, EVP_EncryptFinal_ex, GET_TAG. IVs are Hopper's
 * layout: (LE32 message counter | LE64 channel counter) XOR a per-key mask, +1 per chunk.
 *
 * Usage: driver_emulator {link|dlopen} check ROUNDS
 *          prints a digest of every ciphertext and tag, D2H results and tamper checks:
 *          the output must be identical with and without the interposer.
 *        driver_emulator {link|dlopen} bench CHUNKS GAP_US {cycle|random|cold}
 *          times the critical path (Update + Final + GET_TAG) of 1 MiB chunks, with GAP_US
 *          of busy "device time" after each, and a plain memcpy of the same bytes.
 *        driver_emulator {link|dlopen} stress-d2h THREADS CHUNKS
 *          THREADS channels at once decrypt CHUNKS chunks each into one receive pool, into
 *          neighbouring unaligned regions (pages shared between channels), while another
 *          thread keeps reading the pool; prints how many chunks read back exact.
 *        driver_emulator {link|dlopen} bench-d2h CHUNKS
 *          times the critical path (Init + SET_TAG + Update + Final) of 1 MiB D2H chunks
 *          into a receive pool and into ordinary memory, the time until a pool chunk's
 *          plaintext is readable, and a plain memcpy of the same bytes.
 * With PIPELLM_EMU_WATCH=1 (and the interposer loaded) the source buffers are registered
 * with pipellm_cc_watch, as an application that allocates its weights or KV swap space once
 * would do; with PIPELLM_EMU_RECEIVE=1 the D2H destination pool (one memfd mapped twice) is
 * registered with pipellm_cc_receive. Without the interposer the variables change nothing.
 * PIPELLM_EMU_REKEY=1: every H2D chunk's init passes the cipher and the key again,
 * EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, key, iv) (a driver may well do this);
 * PIPELLM_EMU_REKEY=fresh: every chunk gets a new random key and IV (a program the
 * interposer can never serve: it must cost nothing).
 * Where the check needs the interposer's workers to have finished what they were given (a
 * source modified after its chunk was pre-encrypted, a chunk ready for a split message, a
 * source freed), it calls pipellm_cc_quiesce, which returns once they are idle; without the
 * interposer the function is absent and nothing waits (nothing runs in the background).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

/* OpenSSL 3's declarations, written out so that only the runtime library (libcrypto.so.3),
 * not its development headers, is needed to build this program. */
typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;
typedef struct evp_cipher_st EVP_CIPHER;
typedef struct engine_st ENGINE;
#define EVP_CTRL_GCM_GET_TAG 0x10
#define EVP_CTRL_GCM_SET_TAG 0x11
EVP_CIPHER_CTX *EVP_CIPHER_CTX_new(void);
void EVP_CIPHER_CTX_free(EVP_CIPHER_CTX *);
const EVP_CIPHER *EVP_aes_256_gcm(void);
int EVP_EncryptInit_ex(EVP_CIPHER_CTX *, const EVP_CIPHER *, ENGINE *, const unsigned char *,
                       const unsigned char *);
int EVP_DecryptInit_ex(EVP_CIPHER_CTX *, const EVP_CIPHER *, ENGINE *, const unsigned char *,
                       const unsigned char *);
int EVP_EncryptUpdate(EVP_CIPHER_CTX *, unsigned char *, int *, const unsigned char *, int);
int EVP_DecryptUpdate(EVP_CIPHER_CTX *, unsigned char *, int *, const unsigned char *, int);
int EVP_EncryptFinal_ex(EVP_CIPHER_CTX *, unsigned char *, int *);
int EVP_DecryptFinal_ex(EVP_CIPHER_CTX *, unsigned char *, int *);
int EVP_CIPHER_CTX_ctrl(EVP_CIPHER_CTX *, int, int, void *);

typedef int (*init_fn)(EVP_CIPHER_CTX *, const EVP_CIPHER *, ENGINE *, const unsigned char *,
                       const unsigned char *);
typedef int (*update_fn)(EVP_CIPHER_CTX *, unsigned char *, int *, const unsigned char *, int);
typedef int (*final_fn)(EVP_CIPHER_CTX *, unsigned char *, int *);
typedef int (*ctrl_fn)(EVP_CIPHER_CTX *, int, int, void *);

static struct {
    EVP_CIPHER_CTX *(*ctx_new)(void);
    void (*ctx_free)(EVP_CIPHER_CTX *);
    const EVP_CIPHER *(*aes_256_gcm)(void);
    init_fn enc_init, dec_init;
    update_fn enc_update, dec_update;
    final_fn enc_final, dec_final;
    ctrl_fn ctrl;
} api;

static void *need(void *h, const char *name) {
    void *p = dlsym(h, name);
    if (!p) {
        fprintf(stderr, "dlsym %s: %s\n", name, dlerror());
        exit(2);
    }
    return p;
}

static void *api_handle; /* dlopen mode: the handle the API came from */

/* pipellm's own API (present only under the interposer) for registering watched sources. */
static int (*cc_watch)(const void *, size_t);
static int (*cc_unwatch)(const void *);

static void bind_watch(void) {
    const char *w = getenv("PIPELLM_EMU_WATCH");
    if (!w || strcmp(w, "1") != 0) return;
    void *h = api_handle ? api_handle : RTLD_DEFAULT;
    cc_watch = (int (*)(const void *, size_t))dlsym(h, "pipellm_cc_watch");
    cc_unwatch = (int (*)(const void *))dlsym(h, "pipellm_cc_unwatch");
}

/* ... and for registering a receive pool (D2H destinations decrypted off the critical path) */
static int (*cc_receive)(void *, void *, size_t);
static int (*cc_unreceive)(const void *);

static void bind_receive(void) {
    const char *w = getenv("PIPELLM_EMU_RECEIVE");
    if (!w || strcmp(w, "1") != 0) return;
    void *h = api_handle ? api_handle : RTLD_DEFAULT;
    cc_receive = (int (*)(void *, void *, size_t))dlsym(h, "pipellm_cc_receive");
    cc_unreceive = (int (*)(const void *))dlsym(h, "pipellm_cc_unreceive");
}

/* ... and for waiting until its pre-encryption workers are idle (a test aid) */
static int (*cc_quiesce)(int);

static void bind_quiesce(void) {
    void *h = api_handle ? api_handle : RTLD_DEFAULT;
    cc_quiesce = (int (*)(int))dlsym(h, "pipellm_cc_quiesce");
}

/* Returns once every chunk the interposer's workers were given is ready: what the check
 * would otherwise sleep for, hoping they got there first. */
static void workers_finished(void) {
    int rc = cc_quiesce ? cc_quiesce(60000) : 0;
    if (rc != 0) {
        fprintf(stderr, "pipellm_cc_quiesce: %d\n", rc);
        exit(2);
    }
}

static void watch_range(const void *p, size_t n) {
    int rc = cc_watch ? cc_watch(p, n) : 0;
    if (rc != 0) {
        fprintf(stderr, "pipellm_cc_watch: %d\n", rc);
        exit(2);
    }
}

static void unwatch_range(const void *p) {
    int rc = cc_unwatch ? cc_unwatch(p) : 0;
    if (rc != 0) {
        fprintf(stderr, "pipellm_cc_unwatch: %d\n", rc);
        exit(2);
    }
}

static void bind_api(const char *mode) {
    if (strcmp(mode, "link") == 0) {
        api.ctx_new = EVP_CIPHER_CTX_new;
        api.ctx_free = EVP_CIPHER_CTX_free;
        api.aes_256_gcm = EVP_aes_256_gcm;
        api.enc_init = EVP_EncryptInit_ex;
        api.dec_init = EVP_DecryptInit_ex;
        api.enc_update = EVP_EncryptUpdate;
        api.dec_update = EVP_DecryptUpdate;
        api.enc_final = EVP_EncryptFinal_ex;
        api.dec_final = EVP_DecryptFinal_ex;
        api.ctrl = EVP_CIPHER_CTX_ctrl;
        return;
    }
    void *h = dlopen("libcrypto.so.3", RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        fprintf(stderr, "dlopen libcrypto.so.3: %s\n", dlerror());
        exit(2);
    }
    api_handle = h;
    api.ctx_new = need(h, "EVP_CIPHER_CTX_new");
    api.ctx_free = need(h, "EVP_CIPHER_CTX_free");
    api.aes_256_gcm = need(h, "EVP_aes_256_gcm");
    api.enc_init = need(h, "EVP_EncryptInit_ex");
    api.dec_init = need(h, "EVP_DecryptInit_ex");
    api.enc_update = need(h, "EVP_EncryptUpdate");
    api.dec_update = need(h, "EVP_DecryptUpdate");
    api.enc_final = need(h, "EVP_EncryptFinal_ex");
    api.dec_final = need(h, "EVP_DecryptFinal_ex");
    api.ctrl = need(h, "EVP_CIPHER_CTX_ctrl");
}

/* ---- deterministic randomness and a digest of everything produced ---- */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rnd(void) {
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static void fill(unsigned char *p, size_t n) {
    for (size_t i = 0; i < n; i += 8) {
        uint64_t v = rnd();
        memcpy(p + i, &v, n - i < 8 ? n - i : 8);
    }
}

static uint64_t digest = 0xcbf29ce484222325ull;
static void absorb(const unsigned char *p, size_t n) {
    /* FNV-1a over 64-bit words (and the tail bytes): any changed byte changes the digest */
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        digest = (digest ^ w) * 0x100000001b3ull;
    }
    for (; i < n; i++) digest = (digest ^ p[i]) * 0x100000001b3ull;
    digest ^= n;
}
static unsigned long messages = 0;

/* ---- a channel: one context, its key, mask and counter ---- */

enum layout { MSG32, CHAN64, RANDOM_IV };
typedef struct {
    EVP_CIPHER_CTX *ctx;
    unsigned char key[32], mask[12];
    uint64_t counter;
    enum layout layout;
} channel;

/* 0: keyed once, IV-only inits (the driver's pattern); 1: cipher + same key at every init;
 * 2: a fresh key (and the channel's IVs) at every init. */
static int rekey;

static void bind_rekey(void) {
    const char *w = getenv("PIPELLM_EMU_REKEY");
    rekey = !w ? 0 : strcmp(w, "1") == 0 ? 1 : strcmp(w, "fresh") == 0 ? 2 : 0;
}

static void channel_open(channel *c, enum layout l) {
    c->ctx = api.ctx_new();
    fill(c->key, 32);
    fill(c->mask, 12);
    c->counter = l == MSG32 ? 1 : 0;
    c->layout = l;
    if (api.enc_init(c->ctx, api.aes_256_gcm(), NULL, c->key, NULL) != 1) {
        fprintf(stderr, "init failed\n");
        exit(3);
    }
}

static void next_iv(channel *c, unsigned char iv[12]) {
    memset(iv, 0, 12);
    if (c->layout == MSG32) {
        uint32_t m = (uint32_t)c->counter;
        memcpy(iv, &m, 4); /* little-endian host */
    } else if (c->layout == CHAN64) {
        memcpy(iv + 4, &c->counter, 8);
    } else {
        fill(iv, 12);
    }
    for (int i = 0; i < 12; i++) iv[i] ^= c->mask[i];
    c->counter++;
}

static unsigned char *bounce;

/* One driver chunk: returns critical-path nanoseconds. `split` sends the data in two
 * Update calls, the chunk and 16 more bytes (not the driver's pattern: after a hit on the
 * first, it exercises the interposer's resync). */
static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

static double encrypt_chunk(channel *c, const unsigned char *src, int len, int split) {
    unsigned char iv[12], tag[16];
    int n = 0, m = 0;
    next_iv(c, iv);
    if (rekey == 2) fill(c->key, 32);
    double t0 = now_ns();
    int ok = rekey ? api.enc_init(c->ctx, api.aes_256_gcm(), NULL, c->key, iv) == 1
                   : api.enc_init(c->ctx, NULL, NULL, NULL, iv) == 1;
    if (split) {
        /* the whole chunk, then 16 more bytes in the same message */
        static const unsigned char extra[16] = "sixteen  bytes!";
        ok &= api.enc_update(c->ctx, bounce, &n, src, len) == 1;
        ok &= api.enc_update(c->ctx, bounce + n, &m, extra, 16) == 1;
        n += m;
        len += 16;
    } else {
        ok &= api.enc_update(c->ctx, bounce, &n, src, len) == 1;
    }
    ok &= api.enc_final(c->ctx, bounce + n, &m) == 1;
    ok &= api.ctrl(c->ctx, EVP_CTRL_GCM_GET_TAG, 16, tag) == 1;
    double t1 = now_ns();
    if (!ok || n + m != len) {
        fprintf(stderr, "encryption failed (n=%d m=%d len=%d)\n", n, m, len);
        exit(4);
    }
    absorb(bounce, (size_t)len);
    absorb(tag, 16);
    messages++;
    return t1 - t0;
}

static void spin_us(double us) {
    double end = now_ns() + us * 1e3;
    while (now_ns() < end) {
    }
}

/* A transfer: chunks of at most 1 MiB, as the driver splits them; after each, the copy
 * engine's time for it (the driver waits for its bounce buffer), 200 us per MiB. */
static void transfer(channel *c, const unsigned char *src, size_t len, int split_first) {
    for (size_t off = 0; off < len; off += 1 << 20) {
        size_t n = len - off < (1u << 20) ? len - off : (1u << 20);
        encrypt_chunk(c, src + off, (int)n, split_first && off == 0);
        spin_us(200.0 * (double)n / (1 << 20));
    }
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* ---- D2H: the device encrypted, the CPU decrypts and must reject tampering ---- */

/* The device's side of a D2H chunk (here the CPU stands in for it): encrypts `len` bytes of
 * `data` on its channel into `out`, and returns the IV and tag the driver decrypts with. */
static void device_encrypt(channel *dev, const unsigned char *data, int len, unsigned char *out,
                           unsigned char iv[12], unsigned char tag[16]) {
    int n = 0, m = 0;
    next_iv(dev, iv);
    api.enc_init(dev->ctx, NULL, NULL, NULL, iv);
    api.enc_update(dev->ctx, out, &n, data, len);
    api.enc_final(dev->ctx, out + n, &m);
    api.ctrl(dev->ctx, EVP_CTRL_GCM_GET_TAG, 16, tag);
}

static int d2h(channel *dev, EVP_CIPHER_CTX *dctx, int tamper) {
    unsigned char data[4096], ct[4096], out[4096], iv[12], tag[16];
    int n = 0, m = 0;
    fill(data, sizeof data);
    device_encrypt(dev, data, sizeof data, ct, iv, tag);
    if (tamper) ct[100] ^= 1;
    api.dec_init(dctx, api.aes_256_gcm(), NULL, dev->key, iv);
    api.dec_update(dctx, out, &n, ct, sizeof ct);
    api.ctrl(dctx, EVP_CTRL_GCM_SET_TAG, 16, tag);
    int ok = api.dec_final(dctx, out + n, &m) == 1;
    return ok && memcmp(out, data, sizeof data) == 0;
}

/* A receive pool: one memfd mapped twice; the application reads `view`, the interposer
 * writes deferred plaintext through `alias`. Registered when PIPELLM_EMU_RECEIVE=1. */
typedef struct {
    unsigned char *view, *alias;
    size_t len;
} pool;

static pool pool_open(size_t len) {
    pool p = {0};
    int fd = memfd_create("emu-receive-pool", 0);
    if (fd < 0 || ftruncate(fd, (off_t)len) != 0) {
        perror("memfd");
        exit(5);
    }
    p.view = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    p.alias = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p.view == MAP_FAILED || p.alias == MAP_FAILED) {
        perror("mmap pool");
        exit(5);
    }
    p.len = len;
    int rc = cc_receive ? cc_receive(p.view, p.alias, len) : 0;
    if (rc != 0) {
        fprintf(stderr, "pipellm_cc_receive: %d\n", rc);
        exit(2);
    }
    return p;
}

static void pool_close(pool *p) {
    int rc = cc_unreceive ? cc_unreceive(p->view) : 0;
    if (rc != 0) {
        fprintf(stderr, "pipellm_cc_unreceive: %d\n", rc);
        exit(2);
    }
    munmap(p->view, p->len);
    munmap(p->alias, p->len);
}

/* A D2H chunk in the driver's pattern on a context keyed once: the device encrypted `len`
 * bytes of `data` (its channel `dev`), the CPU decrypts them into `dst`. `how`: 0 plain,
 * 1 tampered ciphertext, 2 abandoned after its Update (re-init without Final). Returns the
 * Final's answer (or 1 for an abandoned chunk). */
static int d2h_chunk(channel *dev, EVP_CIPHER_CTX *dctx, const unsigned char *data, int len,
                     unsigned char *dst, int how) {
    unsigned char iv[12], tag[16];
    int n = 0, m = 0;
    device_encrypt(dev, data, len, bounce, iv, tag);
    if (how == 1) bounce[len / 3] ^= 0x20;
    api.dec_init(dctx, NULL, NULL, NULL, iv);
    api.ctrl(dctx, EVP_CTRL_GCM_SET_TAG, 16, tag);
    if (api.dec_update(dctx, dst, &n, bounce, len) != 1 || n != len) {
        fprintf(stderr, "DecryptUpdate failed\n");
        exit(4);
    }
    memset(bounce, 0x5a, (size_t)len); /* the driver reuses its bounce buffer */
    if (how == 2) return 1;
    return api.dec_final(dctx, dst + n, &m) == 1;
}

/* Chunks of several sizes and alignments into a pool: every plaintext must be right when
 * read (a read may wait for it), abandoned chunks hold what OpenSSL leaves. */
static int d2h_pool_round(channel *dev, EVP_CIPHER_CTX *dctx, pool *p, int r) {
    static const struct { size_t off; int len; } plan[] = {
        {0, 1 << 20}, {1 << 20, 1 << 20}, {(2u << 20) + 100, (256 << 10) + 77},
        {(3u << 20), 4096}, {(3u << 20) + 4096, 12345}, {(3u << 20) + 20000, 1 << 20},
    };
    static unsigned char data[1 << 20];
    int ok = 0, abandoned = -1;
    for (int i = 0; i < (int)(sizeof plan / sizeof plan[0]); i++) {
        fill(data, (size_t)plan[i].len);
        int abandon = (r % 4 == 3) && i == 2;
        int good = d2h_chunk(dev, dctx, data, plan[i].len, p->view + plan[i].off, abandon ? 2 : 0);
        if (abandon) {
            /* re-initialised mid-message by the next chunk: then OpenSSL's (unverified)
             * plaintext is there; read only after that (as with any copy, reading the
             * destination before the call that fills it is done is a race) */
            abandoned = i;
            continue;
        }
        ok += good && memcmp(p->view + plan[i].off, data, (size_t)plan[i].len) == 0;
        absorb(p->view + plan[i].off, (size_t)plan[i].len);
    }
    if (abandoned >= 0) absorb(p->view + plan[abandoned].off, (size_t)plan[abandoned].len);
    return ok;
}

static unsigned char *map(size_t n) {
    unsigned char *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(5);
    }
    return p;
}

#define LAYERS 6
#define LAYER_BYTES ((5u << 20) / 2) /* 2.5 MiB: chunks of 1, 1 and 0.5 MiB */
#define BLOCKS 8
#define BLOCK_BYTES (256u << 10)

static int check(int rounds) {
    channel weights, kv, odd, dev;
    channel_open(&weights, MSG32);
    channel_open(&kv, CHAN64);
    channel_open(&odd, RANDOM_IV);
    channel_open(&dev, MSG32);
    EVP_CIPHER_CTX *dctx = api.ctx_new();
    unsigned char *layer[LAYERS], *block[BLOCKS], meta[64], nop = 0;
    for (int i = 0; i < LAYERS; i++) {
        layer[i] = map(LAYER_BYTES);
        fill(layer[i], LAYER_BYTES);
        watch_range(layer[i], LAYER_BYTES);
    }
    for (int i = 0; i < BLOCKS; i++) {
        block[i] = map(BLOCK_BYTES);
        fill(block[i], BLOCK_BYTES);
        watch_range(block[i], BLOCK_BYTES);
    }
    fill(meta, sizeof meta);
    int d2h_ok = 0, tamper_rejected = 0;
    for (int r = 0; r < rounds; r++) {
        for (int i = 0; i < LAYERS; i++) {
            if (r == 10 && i == 4) continue;          /* a skipped layer: mispredictions */
            if (r == 9 && i == 2) {
                /* a source modified after its chunk was pre-encrypted (the interposer's
                 * workers get there first): must not be served stale */
                workers_finished();
                memset(layer[2] + 12345, r, 777);
            }
            if (r == 11 && i == 5) {                  /* freed and mapped again */
                workers_finished(); /* its chunks were read from the old mapping */
                unwatch_range(layer[5]); /* the registrant's side of the contract */
                munmap(layer[5], LAYER_BYTES);
                layer[5] = map(LAYER_BYTES);
                fill(layer[5], LAYER_BYTES);
                watch_range(layer[5], LAYER_BYTES);
            }
            int split = (r == 5 || r == 6 || r == 7) && i == 1;
            if (split) workers_finished(); /* its first chunk is ready: a hit, then a resync */
            transfer(&weights, layer[i], LAYER_BYTES, split);
            encrypt_chunk(&weights, meta, sizeof meta, 0); /* interleaved small copy */
            if (i % 3 == 2) encrypt_chunk(&weights, &nop, 1, 0); /* a 1-byte NOP copy */
        }
        /* swap-in of KV blocks, first in first out, on a second channel */
        for (int b = 0; b < BLOCKS; b++) transfer(&kv, block[(b + r) % BLOCKS], BLOCK_BYTES, 0);
        /* a context with IVs in no known layout */
        transfer(&odd, layer[r % LAYERS], LAYER_BYTES, 0);
        d2h_ok += d2h(&dev, dctx, 0);
        tamper_rejected += !d2h(&dev, dctx, 1);
    }
    /* D2H into a receive pool (deferred decryption under the interposer when registered),
     * on a context keyed once as the driver's is; the tampered chunk comes last: after it
     * the interposer stops its pipeline, and the H2D copies that follow must stay exact. */
    channel dev2;
    channel_open(&dev2, CHAN64);
    EVP_CIPHER_CTX *pctx = api.ctx_new();
    api.dec_init(pctx, api.aes_256_gcm(), NULL, dev2.key, NULL);
    pool rp = pool_open(5u << 20);
    int pool_ok = 0;
    for (int r = 0; r < rounds; r++) pool_ok += d2h_pool_round(&dev2, pctx, &rp, r);
    static unsigned char tdata[1 << 20];
    fill(tdata, sizeof tdata);
    int pool_tamper_rejected = !d2h_chunk(&dev2, pctx, tdata, 1 << 20, rp.view, 1);
    /* a rejected chunk never shows its ciphertext or unverified plaintext: zeroes (the
     * interposer) or, without it, OpenSSL's unverified output, which is not the data */
    int leaked = memcmp(rp.view, tdata, 4096) == 0;
    for (int i = 0; i < LAYERS; i++) transfer(&weights, layer[i], LAYER_BYTES, 0);
    pool_close(&rp);
    api.ctx_free(pctx);
    printf("digest %016llx messages %lu d2h_ok %d tamper_rejected %d pool_ok %d "
           "pool_tamper_rejected %d leaked %d\n",
           (unsigned long long)digest, messages, d2h_ok, tamper_rejected, pool_ok,
           pool_tamper_rejected, leaked);
    api.ctx_free(dctx);
    return 0;
}

/* The driver's decryption of one D2H chunk from the bounce buffer into `dst`, timed from its
 * first call to its Final's return (written to *ns); returns the Final's answer. */
static int driver_decrypt(EVP_CIPHER_CTX *dctx, unsigned char iv[12], unsigned char tag[16],
                          unsigned char *dst, int len, double *ns) {
    int n = 0, m = 0;
    double t0 = now_ns();
    api.dec_init(dctx, NULL, NULL, NULL, iv);
    api.ctrl(dctx, EVP_CTRL_GCM_SET_TAG, 16, tag);
    api.dec_update(dctx, dst, &n, bounce, len);
    int ok = api.dec_final(dctx, dst + n, &m) == 1;
    *ns = now_ns() - t0;
    return ok;
}

static int bench_d2h(int chunks) {
    enum { CHUNK = 1 << 20, SLOTS = 16 };
    /* the device's encryption is the GPU's work, not the CPU's: IVs in no layout keep the
     * interposer from pre-encrypting for it (its context stays in pass-through) */
    channel dev;
    channel_open(&dev, RANDOM_IV);
    EVP_CIPHER_CTX *dctx = api.ctx_new();
    api.dec_init(dctx, api.aes_256_gcm(), NULL, dev.key, NULL);
    pool rp = pool_open((size_t)CHUNK * SLOTS);
    /* destinations cycle through 16 MiB either way: as cold in cache as the pool's */
    unsigned char *plain_dsts = map((size_t)CHUNK * SLOTS), *copy_dst = map(CHUNK), *data = map(CHUNK);
    memset(plain_dsts, 1, (size_t)CHUNK * SLOTS);
    fill(data, CHUNK);
    double *tp = calloc((size_t)chunks, sizeof(double)), *to = calloc((size_t)chunks, sizeof(double));
    double *tr = calloc((size_t)chunks, sizeof(double)), *tm = calloc((size_t)chunks, sizeof(double));
    int bad = 0;
    for (int k = 0; k < chunks; k++) {
        unsigned char *dst = rp.view + (size_t)(k % SLOTS) * CHUNK;
        unsigned char iv[12], tag[16];
        /* the device side (not timed): encrypt into the bounce buffer */
        device_encrypt(&dev, data, CHUNK, bounce, iv, tag);
        double t0 = now_ns();
        int ok = driver_decrypt(dctx, iv, tag, dst, CHUNK, &tp[k]);
        /* when the plaintext is readable: touch the chunk's last byte (waits if sealed) */
        volatile unsigned char last = dst[CHUNK - 1];
        (void)last;
        tr[k] = now_ns() - t0;
        bad += !ok || memcmp(dst, data, 64) != 0;
        /* the same chunk into ordinary memory: OpenSSL's decryption (forwarded) */
        unsigned char *plain_dst = plain_dsts + (size_t)((k + 7) % SLOTS) * CHUNK;
        device_encrypt(&dev, data, CHUNK, bounce, iv, tag);
        bad += !driver_decrypt(dctx, iv, tag, plain_dst, CHUNK, &to[k]);
        t0 = now_ns();
        memcpy(copy_dst, bounce, CHUNK);
        tm[k] = now_ns() - t0;
        __asm__ volatile("" ::: "memory");
    }
    int skip = chunks / 4;
    double *all[] = {tp, to, tr, tm};
    for (int i = 0; i < 4; i++) qsort(all[i] + skip, (size_t)(chunks - skip), sizeof(double), cmp_double);
    int mid = skip + (chunks - skip) / 2;
    printf("pool_us %.2f openssl_us %.2f ready_us %.2f memcpy_us %.2f chunks %d bad %d\n",
           tp[mid] / 1e3, to[mid] / 1e3, tr[mid] / 1e3, tm[mid] / 1e3, chunks - skip, bad);
    pool_close(&rp);
    api.ctx_free(dctx);
    return bad != 0;
}

/* Orders of `bench`: a layer cycle (8 sources of 4 chunks, over and over), random chunks of
 * those sources, or cold: tensors of 32 chunks, all allocated up front and each copied once
 * in order (a model load: no address is ever copied twice). */
enum order { CYCLE, RANDOM, COLD };

static int bench(int chunks, double gap_us, enum order order) {
    enum { SRC_LAYERS = 8, CHUNK = 1 << 20, PER_LAYER = 4, PER_TENSOR = 32 };
    if (chunks <= 0 || chunks > 1 << 20) {
        fprintf(stderr, "bench: CHUNKS must be in 1..%d\n", 1 << 20);
        return 2;
    }
    channel c;
    channel_open(&c, MSG32);
    int sources = order == COLD ? (chunks + PER_TENSOR - 1) / PER_TENSOR : SRC_LAYERS;
    size_t per_source = (size_t)CHUNK * (order == COLD ? PER_TENSOR : PER_LAYER);
    unsigned char **src = calloc((size_t)sources, sizeof(*src));
    for (int i = 0; i < sources; i++) {
        src[i] = map(per_source);
        fill(src[i], per_source);
        watch_range(src[i], per_source);
    }
    double *t = calloc((size_t)chunks, sizeof(double));
    double *tm = calloc((size_t)chunks, sizeof(double));
    unsigned char *copy_dst = map(CHUNK);
    for (int k = 0; k < chunks; k++) {
        int l, j;
        if (order == COLD) {
            l = k / PER_TENSOR;
            j = k % PER_TENSOR;
        } else if (order == RANDOM) {
            l = (int)(rnd() % SRC_LAYERS);
            j = (int)(rnd() % PER_LAYER);
        } else {
            l = (k / PER_LAYER) % SRC_LAYERS;
            j = k % PER_LAYER;
        }
        const unsigned char *p = src[l] + (size_t)j * CHUNK;
        t[k] = encrypt_chunk(&c, p, CHUNK, 0);
        spin_us(gap_us);
        /* the floor: a plain copy of the same bytes into a bounce-like buffer */
        double t0 = now_ns();
        memcpy(copy_dst, p, CHUNK);
        tm[k] = now_ns() - t0;
        __asm__ volatile("" ::: "memory");
    }
    /* steady state: skip the first quarter (learning, cold start); a cold load is all
     * start, so every chunk counts */
    int skip = order == COLD ? 0 : chunks / 4;
    qsort(t + skip, (size_t)(chunks - skip), sizeof(double), cmp_double);
    qsort(tm + skip, (size_t)(chunks - skip), sizeof(double), cmp_double);
    int mid = skip + (chunks - skip) / 2;
    int p10 = skip + (chunks - skip) / 10, p90 = skip + 9 * (chunks - skip) / 10;
    printf("chunk_us %.2f memcpy_us %.2f chunks %d chunk_p10_us %.2f chunk_p90_us %.2f\n",
           t[mid] / 1e3, tm[mid] / 1e3, chunks - skip, t[p10] / 1e3, t[p90] / 1e3);
    return 0;
}

/* ---- D2H under concurrency: channels sharing a pool's pages, a reader racing them ---- */

typedef struct {
    pool *p;
    size_t off, span;
    int chunks, exact;
    uint64_t seed;
} stress_arg;

static uint64_t rnd_r(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void *stress_channel(void *v) {
    stress_arg *a = v;
    unsigned char key[32], iv[12], tag[16];
    for (int i = 0; i < 32; i++) key[i] = (unsigned char)rnd_r(&a->seed);
    EVP_CIPHER_CTX *enc = api.ctx_new(), *dec = api.ctx_new();
    api.enc_init(enc, api.aes_256_gcm(), NULL, key, NULL);
    api.dec_init(dec, api.aes_256_gcm(), NULL, key, NULL);
    unsigned char *data = malloc(a->span), *ct = malloc(a->span), scratch[16];
    for (int k = 0; k < a->chunks; k++) {
        size_t len = 1 + rnd_r(&a->seed) % a->span;
        size_t at = rnd_r(&a->seed) % (a->span - len + 1);
        for (size_t i = 0; i < len; i += 8) {
            uint64_t w = rnd_r(&a->seed);
            memcpy(data + i, &w, len - i < 8 ? len - i : 8);
        }
        for (int i = 0; i < 12; i++) iv[i] = (unsigned char)rnd_r(&a->seed);
        int n = 0, m = 0;
        api.enc_init(enc, NULL, NULL, NULL, iv);
        api.enc_update(enc, ct, &n, data, (int)len);
        api.enc_final(enc, scratch, &m);
        api.ctrl(enc, EVP_CTRL_GCM_GET_TAG, 16, tag);
        unsigned char *dst = a->p->view + a->off + at;
        api.dec_init(dec, NULL, NULL, NULL, iv);
        api.ctrl(dec, EVP_CTRL_GCM_SET_TAG, 16, tag);
        int ok = api.dec_update(dec, dst, &n, ct, (int)len) == 1;
        memset(ct, 0x5a, len);
        ok &= api.dec_final(dec, scratch, &m) == 1;
        a->exact += ok && memcmp(dst, data, len) == 0;
    }
    free(data);
    free(ct);
    api.ctx_free(enc);
    api.ctx_free(dec);
    return NULL;
}

static volatile int stress_done;

static void *stress_reader(void *v) {
    pool *p = v;
    uint64_t s = 42, sum = 0;
    while (!stress_done) sum += p->view[rnd_r(&s) % p->len]; /* may wait on a gated page */
    return (void *)(uintptr_t)(sum & 1);
}

static int stress_d2h(int threads, int chunks) {
    enum { SPAN = (300 << 10) + 123 }; /* unaligned: neighbouring channels share pages */
    pool rp = pool_open(((size_t)SPAN * (size_t)threads + 4095) / 4096 * 4096);
    stress_arg *args = calloc((size_t)threads, sizeof *args);
    pthread_t *tid = calloc((size_t)threads, sizeof *tid), reader;
    pthread_create(&reader, NULL, stress_reader, &rp);
    for (int t = 0; t < threads; t++) {
        args[t] = (stress_arg){&rp, (size_t)t * SPAN, SPAN, chunks, 0, 1000 + (uint64_t)t};
        pthread_create(&tid[t], NULL, stress_channel, &args[t]);
    }
    int exact = 0;
    for (int t = 0; t < threads; t++) {
        pthread_join(tid[t], NULL);
        exact += args[t].exact;
    }
    stress_done = 1;
    pthread_join(reader, NULL);
    pool_close(&rp);
    printf("stress exact %d of %d\n", exact, threads * chunks);
    return exact != threads * chunks;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s {link|dlopen} check ROUNDS | bench CHUNKS GAP_US {cycle|random|cold}\n",
                argv[0]);
        return 1;
    }
    bind_api(argv[1]);
    bind_watch();
    bind_receive();
    bind_quiesce();
    bind_rekey();
    bounce = map(1 << 21);
    if (strcmp(argv[2], "check") == 0) return check(argc > 3 ? atoi(argv[3]) : 10);
    if (strcmp(argv[2], "bench-d2h") == 0 && argc > 3) return bench_d2h(atoi(argv[3]));
    if (strcmp(argv[2], "stress-d2h") == 0 && argc > 4)
        return stress_d2h(atoi(argv[3]), atoi(argv[4]));
    if (strcmp(argv[2], "bench") == 0 && argc > 5)
        return bench(atoi(argv[3]), atof(argv[4]),
                     strcmp(argv[5], "random") == 0 ? RANDOM
                     : strcmp(argv[5], "cold") == 0 ? COLD
                                                    : CYCLE);
    fprintf(stderr, "unknown command\n");
    return 1;
}
