/*
 * libotr_bench: the work items of benches/otr.rs timed on libotr 4.1.1, the
 * C reference implementation, for scripts/bench.sh's comparison table.
 *
 * Two OtrlUserStates (alice, bob) live in this process; inject_message
 * queues each outgoing body on its sender and the harness delivers it to
 * the other side with otrl_message_receiving, until both queues are empty
 * (the same ferrying as benches/otr.rs and tests/peers/libotr_peer.c).
 *
 *   libotr_bench KEYDIR [SCALE]
 *
 * KEYDIR caches the two DSA keys and instance tags (DSA key generation is
 * slow); SCALE (default 1.0) multiplies the iteration counts. Times are
 * wall-clock (CLOCK_MONOTONIC), or the thread's CPU time when the
 * environment has BENCH_CLOCK=cpu. For every
 * work item one line goes to stdout:
 *
 *   RESULT <id> <median_ns> <iterations>
 *
 * Ids: ake/full, data/alternating, data/burst, data/alternating_16k,
 * data/burst_16k (bodies of 1 KiB or 16 KiB of 'x').
 *
 * Build: gcc -O2 -o libotr_bench libotr_bench.c -lotr -lgcrypt -lgpg-error
 */

#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <gcrypt.h>
#include <libotr/proto.h>
#include <libotr/userstate.h>
#include <libotr/privkey.h>
#include <libotr/instag.h>
#include <libotr/message.h>
#include <libotr/context.h>

#define PROTOCOL "xmpp"
#define MAX_QUEUE 64

struct side {
    const char *name;
    const char *peer;
    OtrlUserState us;
    char *queue[MAX_QUEUE]; /* bodies this side sent, not yet delivered */
    int queued;
    int delivered;          /* user messages delivered to this side */
};

static struct side alice = { .name = "alice@example.test", .peer = "bob@example.test" };
static struct side bob = { .name = "bob@example.test", .peer = "alice@example.test" };
static OtrlMessageAppOps ops;
static const OtrlPolicy policy =
    (OTRL_POLICY_OPPORTUNISTIC & ~OTRL_POLICY_VERSION_MASK) | OTRL_POLICY_ALLOW_V3;

static void die(const char *what)
{
    fprintf(stderr, "libotr_bench: %s\n", what);
    exit(2);
}

/* ---------- OtrlMessageAppOps ---------- */

static OtrlPolicy op_policy(void *opdata, ConnContext *context)
{
    (void)opdata; (void)context;
    return policy;
}

static int op_is_logged_in(void *opdata, const char *accountname,
                           const char *protocol, const char *recipient)
{
    (void)opdata; (void)accountname; (void)protocol; (void)recipient;
    return 1;
}

static void op_inject_message(void *opdata, const char *accountname,
                              const char *protocol, const char *recipient,
                              const char *message)
{
    struct side *s = opdata;
    (void)accountname; (void)protocol; (void)recipient;
    if (!message || !*message) return;
    if (s->queued == MAX_QUEUE) die("queue full");
    s->queue[s->queued] = strdup(message);
    if (!s->queue[s->queued]) die("out of memory");
    s->queued++;
}

static void op_noop_ctx(void *opdata, ConnContext *context)
{
    (void)opdata; (void)context;
}

static void op_update_context_list(void *opdata) { (void)opdata; }
static void op_write_fingerprints(void *opdata) { (void)opdata; }

static void op_new_fingerprint(void *opdata, OtrlUserState u,
                               const char *accountname, const char *protocol,
                               const char *username, unsigned char fp[20])
{
    (void)opdata; (void)u; (void)accountname; (void)protocol; (void)username;
    (void)fp;
}

static void op_still_secure(void *opdata, ConnContext *context, int is_reply)
{
    (void)opdata; (void)context; (void)is_reply;
}

static const char *op_otr_error_message(void *opdata, ConnContext *context,
                                        OtrlErrorCode code)
{
    (void)opdata; (void)context; (void)code;
    return strdup("error");
}

static void op_free_string(void *opdata, const char *s)
{
    (void)opdata;
    free((char *)s);
}

static void op_handle_msg_event(void *opdata, OtrlMessageEvent ev,
                                ConnContext *context, const char *message,
                                gcry_error_t e)
{
    (void)opdata; (void)context; (void)message; (void)e;
    switch (ev) {
    case OTRL_MSGEVENT_ENCRYPTION_ERROR:
    case OTRL_MSGEVENT_SETUP_ERROR:
    case OTRL_MSGEVENT_RCVDMSG_UNREADABLE:
    case OTRL_MSGEVENT_RCVDMSG_MALFORMED:
    case OTRL_MSGEVENT_RCVDMSG_NOT_IN_PRIVATE:
        fprintf(stderr, "libotr_bench: message event %d\n", (int)ev);
        exit(2);
    default:
        break;
    }
}

static void op_timer_control(void *opdata, unsigned int interval)
{
    (void)opdata; (void)interval;
}

/* ---------- ferrying ---------- */

/* `to` receives one body sent by `from`. */
static void receive(struct side *from, struct side *to, const char *msg)
{
    char *newmsg = NULL;
    OtrlTLV *tlvs = NULL;
    int ignore = otrl_message_receiving(to->us, &ops, to, to->name, PROTOCOL,
                                        from->name, msg, &newmsg, &tlvs, NULL,
                                        NULL, NULL);
    if (!ignore && newmsg) to->delivered++;
    otrl_tlv_free(tlvs);
    otrl_message_free(newmsg);
}

/* Deliver everything both ways until nobody has anything to send. */
static void run(void)
{
    while (alice.queued || bob.queued) {
        struct side *from = alice.queued ? &alice : &bob;
        struct side *to = from == &alice ? &bob : &alice;
        char *m = from->queue[0];
        from->queued--;
        memmove(from->queue, from->queue + 1, from->queued * sizeof(char *));
        receive(from, to, m);
        free(m);
    }
}

static int encrypted(struct side *s)
{
    ConnContext *c = otrl_context_find(s->us, s->peer, s->name, PROTOCOL,
                                       OTRL_INSTAG_BEST, 0, NULL, NULL, NULL);
    return c && c->msgstate == OTRL_MSGSTATE_ENCRYPTED;
}

/* The AKE from alice's query until both sides are encrypted. */
static void ake(void)
{
    char *q = otrl_proto_default_query_msg(alice.name, policy);
    if (!q) die("no query message");
    receive(&alice, &bob, q);
    free(q);
    run();
}

/* `from` sends `text` to `to`; exactly one message must be delivered. */
static void one_message(struct side *from, struct side *to, const char *text)
{
    char *newmsg = NULL;
    int before = to->delivered;
    gcry_error_t e = otrl_message_sending(from->us, &ops, from, from->name,
                                          PROTOCOL, from->peer,
                                          OTRL_INSTAG_BEST, text, NULL,
                                          &newmsg, OTRL_FRAGMENT_SEND_ALL,
                                          NULL, NULL, NULL);
    if (e) die("otrl_message_sending failed");
    otrl_message_free(newmsg);
    run();
    if (to->delivered != before + 1) die("message not delivered");
}

/* ---------- timing ---------- */

/* CLOCK_MONOTONIC, or the thread's CPU time with BENCH_CLOCK=cpu (as
 * benches/otr.rs with O2TR_BENCH_CLOCK=cpu). */
static clockid_t bench_clock = CLOCK_MONOTONIC;

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(bench_clock, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void report(const char *id, double *t, int n)
{
    double median;
    qsort(t, n, sizeof *t, cmp_double);
    median = n % 2 ? t[n / 2] : (t[n / 2 - 1] + t[n / 2]) / 2;
    printf("RESULT %s %.0f %d\n", id, median, n);
    fflush(stdout);
}

static int scaled(int n, double scale)
{
    int v = (int)(n * scale);
    return v < 5 ? 5 : v;
}

static void fresh_session(void)
{
    otrl_context_forget_all(alice.us);
    otrl_context_forget_all(bob.us);
    ake();
    if (!encrypted(&alice) || !encrypted(&bob)) die("AKE did not complete");
}

static void bench_ake(int n)
{
    double *t = malloc(n * sizeof *t);
    int i;
    for (i = -3; i < n; i++) {
        double t0;
        otrl_context_forget_all(alice.us);
        otrl_context_forget_all(bob.us);
        t0 = now_ns();
        ake();
        if (i >= 0) t[i] = now_ns() - t0;
        if (!encrypted(&alice) || !encrypted(&bob)) die("AKE did not complete");
    }
    report("ake/full", t, n);
    free(t);
}

static void bench_alternating(const char *id, const char *text, int n)
{
    double *t = malloc(n * sizeof *t);
    int i;
    fresh_session();
    for (i = -4; i < n; i++) {
        double t0 = now_ns();
        if (i % 2) one_message(&bob, &alice, text);
        else one_message(&alice, &bob, text);
        if (i >= 0) t[i] = now_ns() - t0;
    }
    report(id, t, n);
    free(t);
}

static void bench_burst(const char *id, const char *text, int n)
{
    double *t = malloc(n * sizeof *t);
    int i;
    fresh_session();
    for (i = -4; i < n; i++) {
        double t0 = now_ns();
        one_message(&alice, &bob, text);
        if (i >= 0) t[i] = now_ns() - t0;
    }
    report(id, t, n);
    free(t);
}

/* ---------- set-up ---------- */

static void load_keys(struct side *s, const char *dir)
{
    char keyfile[4096], instagfile[4096];
    snprintf(keyfile, sizeof keyfile, "%s/%s.private_key", dir, s->name);
    snprintf(instagfile, sizeof instagfile, "%s/%s.instance_tags", dir, s->name);
    s->us = otrl_userstate_create();
    if (access(keyfile, R_OK) == 0) otrl_privkey_read(s->us, keyfile);
    if (!otrl_privkey_find(s->us, s->name, PROTOCOL) &&
        otrl_privkey_generate(s->us, keyfile, s->name, PROTOCOL))
        die("key generation failed");
    if (access(instagfile, R_OK) == 0) otrl_instag_read(s->us, instagfile);
    if (!otrl_instag_find(s->us, s->name, PROTOCOL) &&
        otrl_instag_generate(s->us, instagfile, s->name, PROTOCOL))
        die("instance tag generation failed");
}

static char *body(size_t n)
{
    char *b = malloc(n + 1);
    if (!b) die("out of memory");
    memset(b, 'x', n);
    b[n] = '\0';
    return b;
}

int main(int argc, char **argv)
{
    double scale = 1.0;
    char *k1, *k16;
    if (argc < 2) {
        fprintf(stderr, "usage: libotr_bench KEYDIR [SCALE]\n");
        return 2;
    }
    if (argc > 2) scale = atof(argv[2]);
    if (getenv("BENCH_CLOCK") && !strcmp(getenv("BENCH_CLOCK"), "cpu"))
        bench_clock = CLOCK_THREAD_CPUTIME_ID;
    mkdir(argv[1], 0700);

    OTRL_INIT;
    memset(&ops, 0, sizeof ops);
    ops.policy = op_policy;
    ops.is_logged_in = op_is_logged_in;
    ops.inject_message = op_inject_message;
    ops.update_context_list = op_update_context_list;
    ops.new_fingerprint = op_new_fingerprint;
    ops.write_fingerprints = op_write_fingerprints;
    ops.gone_secure = op_noop_ctx;
    ops.gone_insecure = op_noop_ctx;
    ops.still_secure = op_still_secure;
    ops.otr_error_message = op_otr_error_message;
    ops.otr_error_message_free = op_free_string;
    ops.handle_msg_event = op_handle_msg_event;
    ops.timer_control = op_timer_control;
    /* max_message_size NULL: no fragmentation, as in benches/otr.rs. */

    load_keys(&alice, argv[1]);
    load_keys(&bob, argv[1]);

    k1 = body(1024);
    k16 = body(16 * 1024);
    bench_ake(scaled(200, scale));
    bench_alternating("data/alternating", k1, scaled(400, scale));
    bench_burst("data/burst", k1, scaled(4000, scale));
    bench_alternating("data/alternating_16k", k16, scaled(400, scale));
    bench_burst("data/burst_16k", k16, scaled(2000, scale));
    free(k1);
    free(k16);
    otrl_userstate_free(alice.us);
    otrl_userstate_free(bob.us);
    return 0;
}
