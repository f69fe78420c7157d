#!/usr/bin/env python3
"""potr_peer: a line-protocol driver around python-potr 1.0.2 (OTR v2 only),
used by o2tr-proxy's interop tests.  Speaks the same line protocol as
libotr_peer.c (see tests/peers/README.md).

Run with the Python 3.7 venv that has python-potr + pycrypto installed
(default /opt/potr-venv/bin/python).
"""

import argparse
import base64
import binascii
import fcntl
import logging
import os
import sys
import traceback

import potr
from potr import compatcrypto, crypt, proto
from potr.context import (
    FRAGMENT_SEND_ALL,
    STATE_ENCRYPTED,
    STATE_FINISHED,
    STATE_PLAINTEXT,
    ErrorReceived,
    NotEncryptedError,
    NotOTRMessage,
    UnencryptedMessage,
)

PROTOCOL = 'xmpp'
OUT = sys.stdout


def emit(line):
    OUT.write(line + '\n')


def b64(data):
    if isinstance(data, str):
        data = data.encode('utf-8')
    return base64.b64encode(data).decode('ascii')


def unb64(text):
    return base64.b64decode(text.encode('ascii'), validate=True)


def event(name, detail=None):
    if detail is None:
        emit('EVENT ' + name)
    else:
        emit('EVENT %s %s' % (name, detail))


class DirLock(object):
    """Exclusive flock on DIR/.lock, so parallel peers sharing a key
    directory do not both generate a key."""

    def __init__(self, directory):
        self.path = os.path.join(directory, '.lock')

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


class PeerContext(potr.context.Context):
    """Context for the one peer we talk to; reports state changes."""

    def __init__(self, account, peername):
        self.got_data = False
        super(PeerContext, self).__init__(account, peername)

    def getPolicy(self, key):
        return self.user.policy_flags.get(key, False)

    def inject(self, msg, appdata=None):
        if msg:
            emit('WIRE ' + b64(msg))

    def setState(self, newstate):
        old = getattr(self, 'state', STATE_PLAINTEXT)
        super(PeerContext, self).setState(newstate)
        if newstate == STATE_ENCRYPTED:
            if old == STATE_ENCRYPTED:
                event('still_secure')
            else:
                fpr = self.crypto.theirPubkey.cfingerprint()
                if self.getTrust(fpr) is None:
                    event('new_fingerprint', fpr)
                    self.setTrust(fpr, '')
                event('gone_secure')
        elif newstate == STATE_FINISHED and old != STATE_FINISHED:
            event('finished')

    def processTLVs(self, tlvs, appdata=None):
        # Only called after a data message was decrypted and verified.
        self.got_data = True
        super(PeerContext, self).processTLVs(tlvs, appdata=appdata)


class PeerAccount(potr.context.Account):
    contextclass = PeerContext

    def __init__(self, name, directory, policy_flags, max_message_size):
        super(PeerAccount, self).__init__(name, PROTOCOL, max_message_size)
        self.directory = directory
        self.policy_flags = policy_flags
        self.keyfile = os.path.join(directory, 'potr.private_key')
        self.trustfile = os.path.join(directory, 'potr.fingerprints')
        self.loadTrusts()

    def loadPrivkey(self):
        try:
            with open(self.keyfile, 'rb') as f:
                data = f.read()
        except IOError:
            return None
        key, _rest = compatcrypto.PK.parsePrivateKey(data)
        return key

    def savePrivkey(self):
        tmp = self.keyfile + '.tmp'
        with open(tmp, 'wb') as f:
            f.write(self.privkey.serializePrivateKey())
        os.rename(tmp, self.keyfile)

    def loadTrusts(self):
        try:
            with open(self.trustfile, 'r') as f:
                for line in f:
                    parts = line.rstrip('\n').split('\t')
                    if len(parts) == 3:
                        self.trusts.setdefault(parts[0], {})[parts[1]] = parts[2]
        except IOError:
            pass

    def saveTrusts(self):
        with DirLock(self.directory):
            tmp = self.trustfile + '.tmp'
            with open(tmp, 'w') as f:
                for peer, fprs in self.trusts.items():
                    for fpr, trust in fprs.items():
                        f.write('%s\t%s\t%s\n' % (peer, fpr, trust))
            os.rename(tmp, self.trustfile)


def smp_events(ctx, tlvs):
    """potr has no SMP callbacks: derive libotr-style events from the TLVs
    just handled and the SMP handler's state afterwards."""
    smp = ctx.crypto.smp
    for tlv in tlvs:
        if isinstance(tlv, proto.SMPABORTTLV):
            event('smp_abort')
        elif isinstance(tlv, (proto.SMP1TLV, proto.SMP1QTLV)):
            if smp is not None and smp.state == 0 and smp.prog == crypt.SMPPROG_OK:
                if isinstance(tlv, proto.SMP1QTLV):
                    event('smp_request', b64(tlv.msg))
                else:
                    event('smp_request')
            else:
                event('smp_error')
        elif isinstance(tlv, proto.SMP2TLV):
            if smp is not None and smp.prog == crypt.SMPPROG_OK:
                event('smp_inprogress')
            else:
                event('smp_error')
        elif isinstance(tlv, (proto.SMP3TLV, proto.SMP4TLV)):
            prog = smp.prog if smp is not None else crypt.SMPPROG_CHEATED
            if prog == crypt.SMPPROG_SUCCEEDED:
                event('smp_success')
            elif prog == crypt.SMPPROG_FAILED:
                event('smp_failure')
            else:
                event('smp_error')


class Peer(object):
    def __init__(self, args):
        versions_v2 = args.policy in ('v2', 'v23')
        flags = {
            'ALLOW_V1': False,
            'ALLOW_V2': versions_v2,
            'REQUIRE_ENCRYPTION': args.always,
            # libotr's OPPORTUNISTIC sends whitespace tags; ALWAYS does not.
            'SEND_TAG': not args.always,
            'WHITESPACE_START_AKE': True,
            'ERROR_START_AKE': True,
        }
        os.makedirs(args.dir, exist_ok=True)
        self.account = PeerAccount(args.account, args.dir, flags,
                                   args.fragment_size)
        with DirLock(args.dir):
            self.account.getPrivkey()
        self.ctx = self.account.getContext(args.peer)

    def fpr(self):
        return self.account.getPrivkey().cfingerprint()

    # --- commands; each returns None (OK) or an error string (ERR) ---

    def cmd_send(self, arg):
        text = unb64(arg)
        try:
            msg = self.ctx.sendMessage(FRAGMENT_SEND_ALL, text)
        except NotEncryptedError:
            # FINISHED state: nothing is sent (libotr: CONNECTION_ENDED).
            event('connection_ended')
            return None
        if msg is not None:
            # Plaintext (possibly tagged) or a query: potr hands it back to
            # the application to send.
            if self.ctx.state == STATE_PLAINTEXT and self.ctx.getPolicy('REQUIRE_ENCRYPTION'):
                event('encryption_required')
            emit('WIRE ' + b64(msg))
        return None

    def cmd_recv(self, arg):
        wire = unb64(arg)
        self.ctx.got_data = False
        shown = False
        try:
            plaintext, tlvs = self.ctx.receiveMessage(wire)
            smp_events(self.ctx, tlvs)
            if plaintext:
                emit('PLAIN ' + b64(plaintext))
                shown = True
            elif self.ctx.got_data:
                event('heartbeat_rcvd')
        except NotOTRMessage as e:
            emit('PLAIN ' + b64(e.args[0]))
            shown = True
        except UnencryptedMessage as e:
            event('unencrypted', b64(e.args[0]))
        except NotEncryptedError:
            event('not_private')
        except ErrorReceived as e:
            err = e.args[0].error
            event('otr_error', b64(err.lstrip(b' ')))
        except crypt.InvalidParameterError:
            event('unreadable')
        except Exception:  # potr raises assorted errors on garbage
            traceback.print_exc(file=sys.stderr)
            event('malformed')
        if not shown:
            event('ignored')
        return None

    def cmd_query(self, arg):
        emit('WIRE ' + b64(self.account.getDefaultQueryMessage(self.ctx.getPolicy)))

    def cmd_end(self, arg):
        self.ctx.disconnect()

    def cmd_status(self, arg):
        st = self.ctx.state
        if st == STATE_ENCRYPTED:
            emit('STATUS encrypted')
            emit('PEERFPR ' + self.ctx.crypto.theirPubkey.cfingerprint())
            emit('VERSION 2')
        elif st == STATE_FINISHED:
            emit('STATUS finished')
        else:
            emit('STATUS plaintext')

    def cmd_fpr(self, arg):
        emit('FPR ' + self.fpr())

    def cmd_instag(self, arg):
        return 'potr speaks OTR v2 only: no instance tags'

    def _encrypted(self):
        return self.ctx.state == STATE_ENCRYPTED

    def cmd_smp(self, arg):
        if not self._encrypted():
            return 'not encrypted'
        self.ctx.smpInit(unb64(arg))

    def cmd_smpq(self, arg):
        parts = arg.split(' ')
        if len(parts) != 2:
            return 'usage: SMPQ <b64 question> <b64 secret>'
        if not self._encrypted():
            return 'not encrypted'
        self.ctx.smpInit(unb64(parts[1]), question=unb64(parts[0]))

    def cmd_smpanswer(self, arg):
        if not self._encrypted():
            return 'not encrypted'
        self.ctx.smpGotSecret(unb64(arg))

    def cmd_smpabort(self, arg):
        if not self._encrypted():
            return 'not encrypted'
        self.ctx.smpAbort()

    def cmd_tick(self, arg):
        emit('TIMER 0')


COMMANDS = {
    'SEND': Peer.cmd_send,
    'RECV': Peer.cmd_recv,
    'QUERY': Peer.cmd_query,
    'END': Peer.cmd_end,
    'STATUS': Peer.cmd_status,
    'FPR': Peer.cmd_fpr,
    'INSTAG': Peer.cmd_instag,
    'SMP': Peer.cmd_smp,
    'SMPQ': Peer.cmd_smpq,
    'SMPANSWER': Peer.cmd_smpanswer,
    'SMPABORT': Peer.cmd_smpabort,
    'TICK': Peer.cmd_tick,
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--account', required=True)
    ap.add_argument('--peer', required=True)
    ap.add_argument('--dir', required=True)
    ap.add_argument('--policy', choices=['v2', 'v3', 'v23'], default='v2')
    ap.add_argument('--fragment-size', type=int, default=0)
    ap.add_argument('--always', action='store_true')
    args = ap.parse_args()

    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)

    peer = Peer(args)
    emit('READY ' + peer.fpr())
    OUT.flush()

    for raw in sys.stdin:
        line = raw.rstrip('\r\n')
        cmd, _, arg = line.partition(' ')
        if cmd == 'QUIT':
            emit('OK')
            OUT.flush()
            break
        handler = COMMANDS.get(cmd)
        if handler is None:
            emit('ERR unknown command %s' % cmd)
            OUT.flush()
            continue
        try:
            error = handler(peer, arg)
        except (binascii.Error, ValueError) as e:
            error = 'bad argument: %s' % e
        except Exception as e:  # report, keep serving
            traceback.print_exc(file=sys.stderr)
            error = '%s: %s' % (type(e).__name__, e)
        if error is None:
            emit('OK')
        else:
            emit('ERR ' + ' '.join(str(error).split()))
        OUT.flush()
    return 0


if __name__ == '__main__':
    sys.exit(main())
