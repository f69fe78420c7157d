/*
 * libotr_peer: a line-protocol driver around libotr 4.1.1 (the C reference
 * OTR implementation), used by o2tr-proxy's interop tests.
 *
 * The test process is the "network": it writes one command per line on our
 * stdin, and reads our answer lines from stdout.  Every command is answered
 * by zero or more lines and then exactly one "OK" or "ERR <text>" line.
 * The protocol is documented in tests/peers/README.md.
 *
 * Build: gcc -O2 -o libotr_peer libotr_peer.c -lotr -lgcrypt -lgpg-error
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gcrypt.h>
#include <libotr/proto.h>
#include <libotr/userstate.h>
#include <libotr/privkey.h>
#include <libotr/instag.h>
#include <libotr/message.h>
#include <libotr/context.h>
#include <libotr/tlv.h>

#define PROTOCOL "xmpp"

static OtrlUserState us;
static OtrlMessageAppOps ops;
static const char *account = NULL;
static const char *peer = NULL;
static const char *dir = NULL;
static OtrlPolicy policy = OTRL_POLICY_OPPORTUNISTIC;
static int fragment_size = 0;
static unsigned int timer_interval = 0;
static unsigned int inject_count = 0;
static char keyfile[4096], instagfile[4096], fprfile[4096], lockfile[4096];

/* ---------- output helpers ---------- */

static const char B64[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* Returns a malloc'd NUL-terminated standard base64 (with padding). */
static char *b64_encode(const unsigned char *data, size_t len)
{
    size_t outlen = ((len + 2) / 3) * 4;
    char *out = malloc(outlen + 1);
    size_t i, o = 0;
    if (!out) { perror("malloc"); exit(2); }
    for (i = 0; i + 2 < len; i += 3) {
        unsigned int v = (data[i] << 16) | (data[i + 1] << 8) | data[i + 2];
        out[o++] = B64[(v >> 18) & 63];
        out[o++] = B64[(v >> 12) & 63];
        out[o++] = B64[(v >> 6) & 63];
        out[o++] = B64[v & 63];
    }
    if (len - i == 1) {
        unsigned int v = data[i] << 16;
        out[o++] = B64[(v >> 18) & 63];
        out[o++] = B64[(v >> 12) & 63];
        out[o++] = '=';
        out[o++] = '=';
    } else if (len - i == 2) {
        unsigned int v = (data[i] << 16) | (data[i + 1] << 8);
        out[o++] = B64[(v >> 18) & 63];
        out[o++] = B64[(v >> 12) & 63];
        out[o++] = B64[(v >> 6) & 63];
        out[o++] = '=';
    }
    out[o] = '\0';
    return out;
}

static int b64_val(int c)
{
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
}

/* Strict-ish decoder: returns malloc'd buffer (NUL-terminated, *outlen set
 * without the NUL), or NULL on invalid input. */
static unsigned char *b64_decode(const char *s, size_t *outlen)
{
    size_t len = strlen(s);
    unsigned char *out = malloc(len / 4 * 3 + 4);
    size_t o = 0;
    unsigned int acc = 0;
    int bits = 0;
    size_t i;
    if (!out) { perror("malloc"); exit(2); }
    for (i = 0; i < len; i++) {
        int v;
        if (s[i] == '=') break;
        v = b64_val((unsigned char)s[i]);
        if (v < 0) { free(out); return NULL; }
        acc = (acc << 6) | (unsigned int)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = (acc >> bits) & 0xff;
        }
    }
    for (; i < len; i++) {
        if (s[i] != '=') { free(out); return NULL; }
    }
    out[o] = '\0';
    *outlen = o;
    return out;
}

static void emit_b64(const char *tag, const char *text)
{
    char *b = b64_encode((const unsigned char *)text, strlen(text));
    printf("%s %s\n", tag, b);
    free(b);
}

static void emit_event(const char *name)
{
    printf("EVENT %s\n", name);
}

static void emit_event_b64(const char *name, const char *text)
{
    char *b = b64_encode((const unsigned char *)(text ? text : ""),
                         text ? strlen(text) : 0);
    printf("EVENT %s %s\n", name, b);
    free(b);
}

static void hex20(char out[41], const unsigned char *fp)
{
    int i;
    for (i = 0; i < 20; i++) sprintf(out + 2 * i, "%02x", fp[i]);
    out[40] = '\0';
}

static void ok(void)
{
    printf("OK\n");
    fflush(stdout);
}

static void err(const char *fmt, ...)
{
    va_list ap;
    printf("ERR ");
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    fflush(stdout);
}

/* ---------- key material, cached in DIR ---------- */

static int lock_dir(void)
{
    int fd = open(lockfile, O_RDWR | O_CREAT, 0600);
    if (fd < 0) { perror(lockfile); exit(2); }
    if (flock(fd, LOCK_EX) != 0) { perror("flock"); exit(2); }
    return fd;
}

static void unlock_dir(int fd)
{
    flock(fd, LOCK_UN);
    close(fd);
}

static void ensure_privkey(void)
{
    int fd = lock_dir();
    otrl_privkey_forget_all(us);
    if (access(keyfile, R_OK) == 0) otrl_privkey_read(us, keyfile);
    if (otrl_privkey_find(us, account, PROTOCOL) == NULL) {
        gcry_error_t e = otrl_privkey_generate(us, keyfile, account, PROTOCOL);
        if (e) {
            fprintf(stderr, "otrl_privkey_generate: %s\n", gcry_strerror(e));
            exit(2);
        }
    }
    unlock_dir(fd);
}

static void ensure_instag(void)
{
    int fd = lock_dir();
    otrl_instag_forget_all(us);
    if (access(instagfile, R_OK) == 0) otrl_instag_read(us, instagfile);
    if (otrl_instag_find(us, account, PROTOCOL) == NULL) {
        gcry_error_t e = otrl_instag_generate(us, instagfile, account, PROTOCOL);
        if (e) {
            fprintf(stderr, "otrl_instag_generate: %s\n", gcry_strerror(e));
            exit(2);
        }
    }
    unlock_dir(fd);
}

/* ---------- OtrlMessageAppOps ---------- */

static OtrlPolicy op_policy(void *opdata, ConnContext *context)
{
    (void)opdata; (void)context;
    return policy;
}

static void op_create_privkey(void *opdata, const char *accountname,
                              const char *protocol)
{
    (void)opdata; (void)accountname; (void)protocol;
    ensure_privkey();
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
    (void)opdata; (void)accountname; (void)protocol; (void)recipient;
    inject_count++;
    /* libotr "sends" an empty string in the FINISHED state: nothing goes on
     * the wire for that. */
    if (message && *message) emit_b64("WIRE", message);
}

static void op_update_context_list(void *opdata) { (void)opdata; }

static void op_new_fingerprint(void *opdata, OtrlUserState u,
                               const char *accountname, const char *protocol,
                               const char *username, unsigned char fp[20])
{
    char hex[41];
    (void)opdata; (void)u; (void)accountname; (void)protocol; (void)username;
    hex20(hex, fp);
    printf("EVENT new_fingerprint %s\n", hex);
}

static void op_write_fingerprints(void *opdata)
{
    int fd;
    (void)opdata;
    fd = lock_dir();
    otrl_privkey_write_fingerprints(us, fprfile);
    unlock_dir(fd);
}

static void op_gone_secure(void *opdata, ConnContext *context)
{
    (void)opdata; (void)context;
    emit_event("gone_secure");
}

static void op_gone_insecure(void *opdata, ConnContext *context)
{
    (void)opdata; (void)context;
    emit_event("gone_insecure");
}

static void op_still_secure(void *opdata, ConnContext *context, int is_reply)
{
    (void)opdata; (void)context; (void)is_reply;
    emit_event("still_secure");
}

static int op_max_message_size(void *opdata, ConnContext *context)
{
    (void)opdata; (void)context;
    return fragment_size;
}

static const char *op_account_name(void *opdata, const char *acct,
                                   const char *protocol)
{
    (void)opdata; (void)protocol;
    return strdup(acct);
}

static void op_account_name_free(void *opdata, const char *name)
{
    (void)opdata;
    free((char *)name);
}

static void op_received_symkey(void *opdata, ConnContext *context,
                               unsigned int use, const unsigned char *usedata,
                               size_t usedatalen, const unsigned char *symkey)
{
    (void)opdata; (void)context; (void)usedata; (void)usedatalen; (void)symkey;
    printf("EVENT symkey %u\n", use);
}

static const char *op_otr_error_message(void *opdata, ConnContext *context,
                                        OtrlErrorCode code)
{
    (void)opdata; (void)context;
    switch (code) {
    case OTRL_ERRCODE_ENCRYPTION_ERROR:
        return strdup("Error occurred encrypting message.");
    case OTRL_ERRCODE_MSG_NOT_IN_PRIVATE:
        return strdup("You sent encrypted data to a peer who wasn't expecting it.");
    case OTRL_ERRCODE_MSG_UNREADABLE:
        return strdup("You transmitted an unreadable encrypted message.");
    case OTRL_ERRCODE_MSG_MALFORMED:
        return strdup("You transmitted a malformed data message.");
    default:
        return strdup("Unknown error.");
    }
}

static void op_otr_error_message_free(void *opdata, const char *msg)
{
    (void)opdata;
    free((char *)msg);
}

static const char *op_resent_msg_prefix(void *opdata, ConnContext *context)
{
    (void)opdata; (void)context;
    return strdup("[resent]");
}

static void op_resent_msg_prefix_free(void *opdata, const char *prefix)
{
    (void)opdata;
    free((char *)prefix);
}

static void op_handle_smp_event(void *opdata, OtrlSMPEvent ev,
                                ConnContext *context,
                                unsigned short progress_percent,
                                char *question)
{
    (void)opdata; (void)progress_percent;
    switch (ev) {
    case OTRL_SMPEVENT_ASK_FOR_SECRET:
        emit_event("smp_request");
        break;
    case OTRL_SMPEVENT_ASK_FOR_ANSWER:
        emit_event_b64("smp_request", question);
        break;
    case OTRL_SMPEVENT_IN_PROGRESS:
        emit_event("smp_inprogress");
        break;
    case OTRL_SMPEVENT_SUCCESS:
        emit_event("smp_success");
        break;
    case OTRL_SMPEVENT_FAILURE:
        emit_event("smp_failure");
        break;
    case OTRL_SMPEVENT_ABORT:
        emit_event("smp_abort");
        break;
    case OTRL_SMPEVENT_CHEATED:
        emit_event("smp_cheated");
        /* As the API documentation asks. */
        otrl_message_abort_smp(us, &ops, NULL, context);
        break;
    case OTRL_SMPEVENT_ERROR:
        emit_event("smp_error");
        otrl_message_abort_smp(us, &ops, NULL, context);
        break;
    default:
        break;
    }
}

static void op_handle_msg_event(void *opdata, OtrlMessageEvent ev,
                                ConnContext *context, const char *message,
                                gcry_error_t e)
{
    (void)opdata; (void)context;
    switch (ev) {
    case OTRL_MSGEVENT_ENCRYPTION_REQUIRED:
        emit_event("encryption_required"); break;
    case OTRL_MSGEVENT_ENCRYPTION_ERROR:
        emit_event("encryption_error"); break;
    case OTRL_MSGEVENT_CONNECTION_ENDED:
        emit_event("connection_ended"); break;
    case OTRL_MSGEVENT_SETUP_ERROR:
        emit_event_b64("setup_error", gcry_strerror(e)); break;
    case OTRL_MSGEVENT_MSG_REFLECTED:
        emit_event("reflected"); break;
    case OTRL_MSGEVENT_MSG_RESENT:
        emit_event("resent"); break;
    case OTRL_MSGEVENT_RCVDMSG_NOT_IN_PRIVATE:
        emit_event("not_private"); break;
    case OTRL_MSGEVENT_RCVDMSG_UNREADABLE:
        emit_event("unreadable"); break;
    case OTRL_MSGEVENT_RCVDMSG_MALFORMED:
        emit_event("malformed"); break;
    case OTRL_MSGEVENT_LOG_HEARTBEAT_RCVD:
        emit_event("heartbeat_rcvd"); break;
    case OTRL_MSGEVENT_LOG_HEARTBEAT_SENT:
        emit_event("heartbeat_sent"); break;
    case OTRL_MSGEVENT_RCVDMSG_GENERAL_ERR:
        emit_event_b64("otr_error", message); break;
    case OTRL_MSGEVENT_RCVDMSG_UNENCRYPTED:
        emit_event_b64("unencrypted", message); break;
    case OTRL_MSGEVENT_RCVDMSG_UNRECOGNIZED:
        emit_event("unrecognized"); break;
    case OTRL_MSGEVENT_RCVDMSG_FOR_OTHER_INSTANCE:
        emit_event("other_instance"); break;
    default:
        printf("EVENT msg_event_%d\n", (int)ev); break;
    }
}

static void op_create_instag(void *opdata, const char *accountname,
                             const char *protocol)
{
    (void)opdata; (void)accountname; (void)protocol;
    ensure_instag();
}

static void op_timer_control(void *opdata, unsigned int interval)
{
    (void)opdata;
    timer_interval = interval;
    printf("EVENT timer %u\n", interval);
}

/* ---------- commands ---------- */

static ConnContext *best_context(void)
{
    return otrl_context_find(us, peer, account, PROTOCOL, OTRL_INSTAG_BEST,
                             0, NULL, NULL, NULL);
}

static ConnContext *encrypted_context(void)
{
    ConnContext *c = best_context();
    if (c == NULL || c->msgstate != OTRL_MSGSTATE_ENCRYPTED) return NULL;
    return c;
}

static void cmd_send(const char *arg)
{
    size_t len;
    unsigned char *text = b64_decode(arg, &len);
    char *newmsg = NULL;
    ConnContext *ctx = NULL;
    gcry_error_t e;
    if (!text) { err("bad base64"); return; }
    if (strlen((char *)text) != len) { free(text); err("text contains NUL"); return; }
    inject_count = 0;
    e = otrl_message_sending(us, &ops, NULL, account, PROTOCOL, peer,
                             OTRL_INSTAG_BEST, (const char *)text, NULL,
                             &newmsg, OTRL_FRAGMENT_SEND_ALL, &ctx, NULL, NULL);
    if (e) {
        otrl_message_free(newmsg);
        free(text);
        err("otrl_message_sending: %s", gcry_strerror(e));
        return;
    }
    /* libotr quirk: with OTRL_FRAGMENT_SEND_ALL and a plaintext context
     * (no whitespace tag added, no query), nothing is injected: the
     * application must send the original text itself. */
    if (inject_count == 0 &&
        (ctx == NULL || ctx->msgstate == OTRL_MSGSTATE_PLAINTEXT)) {
        emit_b64("WIRE", newmsg ? newmsg : (const char *)text);
    }
    otrl_message_free(newmsg);
    free(text);
    ok();
}

static void cmd_recv(const char *arg)
{
    size_t len;
    unsigned char *msg = b64_decode(arg, &len);
    char *newmsg = NULL;
    OtrlTLV *tlvs = NULL;
    ConnContext *ctx = NULL;
    int ignore;
    if (!msg) { err("bad base64"); return; }
    if (strlen((char *)msg) != len) { free(msg); err("message contains NUL"); return; }
    ignore = otrl_message_receiving(us, &ops, NULL, account, PROTOCOL, peer,
                                    (const char *)msg, &newmsg, &tlvs, &ctx,
                                    NULL, NULL);
    /* The peer ended its private conversation (disconnected TLV): libotr
     * moves the context to FINISHED without calling any op. */
    if (ctx && ctx->msgstate == OTRL_MSGSTATE_FINISHED &&
        otrl_tlv_find(tlvs, OTRL_TLV_DISCONNECTED)) {
        emit_event("finished");
    }
    if (!ignore) {
        emit_b64("PLAIN", newmsg ? newmsg : (const char *)msg);
    } else {
        emit_event("ignored");
    }
    otrl_tlv_free(tlvs);
    otrl_message_free(newmsg);
    free(msg);
    ok();
}

static void cmd_query(void)
{
    char *q = otrl_proto_default_query_msg(account, policy);
    if (!q) { err("no query message for this policy"); return; }
    emit_b64("WIRE", q);
    free(q);
    ok();
}

static void cmd_end(void)
{
    otrl_message_disconnect_all_instances(us, &ops, NULL, account, PROTOCOL,
                                          peer);
    ok();
}

static void cmd_status(void)
{
    ConnContext *c = best_context();
    OtrlMessageState st = c ? c->msgstate : OTRL_MSGSTATE_PLAINTEXT;
    switch (st) {
    case OTRL_MSGSTATE_PLAINTEXT: printf("STATUS plaintext\n"); break;
    case OTRL_MSGSTATE_ENCRYPTED: printf("STATUS encrypted\n"); break;
    case OTRL_MSGSTATE_FINISHED: printf("STATUS finished\n"); break;
    }
    if (st == OTRL_MSGSTATE_ENCRYPTED) {
        if (c->active_fingerprint && c->active_fingerprint->fingerprint) {
            char hex[41];
            hex20(hex, c->active_fingerprint->fingerprint);
            printf("PEERFPR %s\n", hex);
        }
        printf("VERSION %u\n", c->protocol_version);
        if (c->protocol_version >= 3)
            printf("THEIRINSTAG %08x\n", c->their_instance);
    }
    ok();
}

static void cmd_fpr(void)
{
    unsigned char fp[20];
    char hex[41];
    if (!otrl_privkey_fingerprint_raw(us, fp, account, PROTOCOL)) {
        err("no private key");
        return;
    }
    hex20(hex, fp);
    printf("FPR %s\n", hex);
    ok();
}

static void cmd_instag(void)
{
    OtrlInsTag *t = otrl_instag_find(us, account, PROTOCOL);
    if (!t) { err("no instance tag"); return; }
    printf("INSTAG %08x\n", t->instag);
    ok();
}

static void cmd_smp(const char *question_b64, const char *secret_b64,
                    int respond)
{
    ConnContext *c = encrypted_context();
    size_t slen, qlen;
    unsigned char *secret, *question = NULL;
    if (!c) { err("not encrypted"); return; }
    secret = b64_decode(secret_b64, &slen);
    if (!secret) { err("bad base64"); return; }
    if (question_b64) {
        question = b64_decode(question_b64, &qlen);
        if (!question) { free(secret); err("bad base64"); return; }
    }
    if (respond)
        otrl_message_respond_smp(us, &ops, NULL, c, secret, slen);
    else if (question)
        otrl_message_initiate_smp_q(us, &ops, NULL, c, (char *)question,
                                    secret, slen);
    else
        otrl_message_initiate_smp(us, &ops, NULL, c, secret, slen);
    free(secret);
    free(question);
    ok();
}

static void cmd_smpabort(void)
{
    ConnContext *c = encrypted_context();
    if (!c) { err("not encrypted"); return; }
    otrl_message_abort_smp(us, &ops, NULL, c);
    ok();
}

static void cmd_tick(void)
{
    otrl_message_poll(us, &ops, NULL);
    printf("TIMER %u\n", timer_interval);
    ok();
}

static void usage(void)
{
    fprintf(stderr, "usage: libotr_peer --account NAME --peer NAME --dir DIR "
            "[--policy v2|v3|v23] [--fragment-size N] [--always]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    int i, always = 0;
    OtrlPolicy versions = OTRL_POLICY_ALLOW_V2 | OTRL_POLICY_ALLOW_V3;
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;

    for (i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--account") && i + 1 < argc) account = argv[++i];
        else if (!strcmp(argv[i], "--peer") && i + 1 < argc) peer = argv[++i];
        else if (!strcmp(argv[i], "--dir") && i + 1 < argc) dir = argv[++i];
        else if (!strcmp(argv[i], "--policy") && i + 1 < argc) {
            const char *p = argv[++i];
            if (!strcmp(p, "v2")) versions = OTRL_POLICY_ALLOW_V2;
            else if (!strcmp(p, "v3")) versions = OTRL_POLICY_ALLOW_V3;
            else if (!strcmp(p, "v23")) versions = OTRL_POLICY_ALLOW_V2 | OTRL_POLICY_ALLOW_V3;
            else usage();
        } else if (!strcmp(argv[i], "--fragment-size") && i + 1 < argc)
            fragment_size = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--always")) always = 1;
        else usage();
    }
    if (!account || !peer || !dir) usage();
    if (always)
        policy = (OTRL_POLICY_ALWAYS & ~OTRL_POLICY_VERSION_MASK) | versions;
    else
        policy = (OTRL_POLICY_OPPORTUNISTIC & ~OTRL_POLICY_VERSION_MASK) | versions;

    mkdir(dir, 0700);
    snprintf(keyfile, sizeof keyfile, "%s/otr.private_key", dir);
    snprintf(instagfile, sizeof instagfile, "%s/otr.instance_tags", dir);
    snprintf(fprfile, sizeof fprfile, "%s/otr.fingerprints", dir);
    snprintf(lockfile, sizeof lockfile, "%s/.lock", dir);

    OTRL_INIT;
    us = otrl_userstate_create();

    memset(&ops, 0, sizeof ops);
    ops.policy = op_policy;
    ops.create_privkey = op_create_privkey;
    ops.is_logged_in = op_is_logged_in;
    ops.inject_message = op_inject_message;
    ops.update_context_list = op_update_context_list;
    ops.new_fingerprint = op_new_fingerprint;
    ops.write_fingerprints = op_write_fingerprints;
    ops.gone_secure = op_gone_secure;
    ops.gone_insecure = op_gone_insecure;
    ops.still_secure = op_still_secure;
    ops.max_message_size = op_max_message_size;
    ops.account_name = op_account_name;
    ops.account_name_free = op_account_name_free;
    ops.received_symkey = op_received_symkey;
    ops.otr_error_message = op_otr_error_message;
    ops.otr_error_message_free = op_otr_error_message_free;
    ops.resent_msg_prefix = op_resent_msg_prefix;
    ops.resent_msg_prefix_free = op_resent_msg_prefix_free;
    ops.handle_smp_event = op_handle_smp_event;
    ops.handle_msg_event = op_handle_msg_event;
    ops.create_instag = op_create_instag;
    ops.convert_msg = NULL;
    ops.convert_free = NULL;
    ops.timer_control = op_timer_control;

    ensure_privkey();
    ensure_instag();
    if (access(fprfile, R_OK) == 0)
        otrl_privkey_read_fingerprints(us, fprfile, NULL, NULL);

    {
        unsigned char fp[20];
        char hex[41];
        if (!otrl_privkey_fingerprint_raw(us, fp, account, PROTOCOL)) {
            fprintf(stderr, "no private key after generation\n");
            return 2;
        }
        hex20(hex, fp);
        printf("READY %s\n", hex);
        fflush(stdout);
    }

    while ((n = getline(&line, &cap, stdin)) > 0) {
        char *cmd, *arg, *arg2;
        while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r')) line[--n] = '\0';
        cmd = line;
        arg = strchr(line, ' ');
        if (arg) *arg++ = '\0';
        else arg = "";

        if (!strcmp(cmd, "SEND")) cmd_send(arg);
        else if (!strcmp(cmd, "RECV")) cmd_recv(arg);
        else if (!strcmp(cmd, "QUERY")) cmd_query();
        else if (!strcmp(cmd, "END")) cmd_end();
        else if (!strcmp(cmd, "STATUS")) cmd_status();
        else if (!strcmp(cmd, "FPR")) cmd_fpr();
        else if (!strcmp(cmd, "INSTAG")) cmd_instag();
        else if (!strcmp(cmd, "SMP")) cmd_smp(NULL, arg, 0);
        else if (!strcmp(cmd, "SMPQ")) {
            arg2 = strchr(arg, ' ');
            if (!arg2) { err("usage: SMPQ <b64 question> <b64 secret>"); continue; }
            *arg2++ = '\0';
            cmd_smp(arg, arg2, 0);
        }
        else if (!strcmp(cmd, "SMPANSWER")) cmd_smp(NULL, arg, 1);
        else if (!strcmp(cmd, "SMPABORT")) cmd_smpabort();
        else if (!strcmp(cmd, "TICK")) cmd_tick();
        else if (!strcmp(cmd, "QUIT")) { ok(); break; }
        else if (!strcmp(cmd, "")) err("empty command");
        else err("unknown command %s", cmd);
    }
    free(line);
    otrl_userstate_free(us);
    return 0;
}
