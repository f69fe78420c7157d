#!/usr/bin/env python3
"""A real XMPP client (slixmpp) driven line by line over stdin/stdout.

Used by o2tr-proxy's end-to-end tests (tests/common/xmpp_client.rs) to play
an ordinary, unmodified XMPP user: directly against ejabberd, or through the
proxy.

Start:
    xmpp_client.py --jid alice@example.test --password pw \
                   --host 127.0.0.1 --port 5222 --ca ca.pem
                   [--plaintext] [--raw] [--carbons] [--sm] [--debug]
                   [--before-presence XML]

After login, initial presence, and the server's echo of that presence (a
message sent before the echo can race the session and land in offline
storage), it prints ``READY <full jid>``. Failures before that print
``ERR <reason>`` and exit with status 2.

Then one command per line; every command is answered by exactly one final
line ``OK [...]`` or ``ERR <reason>``, possibly preceded by data lines.
Bodies and XML are base64 (UTF-8) so they fit on one line.

    SEND <to> <b64 body> [flags]   send a chat message; flags (comma or space
                                   separated): xhtml oob subject receipt
                                   chatstate nostore nopermstore normal
                                   -> OK <id>
    SENDRAW <b64 xml>              send a raw stanza as is -> OK
    WAIT <n> <timeout_s>           wait until n messages with a body were
                                   received in total -> OK <n> | ERR timeout <got>
    RECV                           print the messages not printed yet, in
                                   arrival order, then OK <count>:
                                     MSG <from> <b64 body|-> <stamp|-> <id|-> <type> [<b64 xml>]
                                   Without --raw only messages with a body are
                                   listed; with --raw every message stanza is,
                                   and the 6th field is its XML.
    COUNT                          -> OK <messages with a body received so far>
    MAM [with_jid]                 query our own archive (XEP-0313), print
                                     MAMMSG <from> <to> <b64 body|-> <b64 forwarded xml>
                                   then OK <count>
    PRESENCE                       send available presence again -> OK
    STATUS                         -> OK connected <jid> | OK disconnected
    CLOSE                          clean disconnect (</stream:stream>) -> OK
    ABORT                          drop the TCP connection without closing
                                   the stream -> OK
    CONNECT                        log in again after CLOSE/ABORT ->
                                   OK <full jid> (after the presence echo)
    QUIT                           disconnect and exit -> OK

End of stdin (the test process died) acts like QUIT. The process never
waits for anything without a timeout.
"""

import argparse
import asyncio
import base64
import logging
import sys
import threading
import urllib.parse
import xml.etree.ElementTree as ET

import slixmpp
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

NS_CLIENT = "jabber:client"
NS_DELAY = "urn:xmpp:delay"
NS_MAM = "urn:xmpp:mam:2"
PRESENCE_ECHO_TIMEOUT = 10.0
LOGIN_TIMEOUT = 20.0


def out(line: str) -> None:
    """Write one protocol line to stdout."""
    try:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # The test process is gone: nothing left to do.
        sys.exit(0)


def b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def unb64(text: str) -> str:
    return base64.b64decode(text.encode("ascii"), validate=True).decode("utf-8")


class Received:
    """One received message stanza."""

    def __init__(self, msg):
        xml = msg.xml
        self.sender = str(msg["from"]) or "-"
        body = xml.find("{%s}body" % NS_CLIENT)
        self.body = (body.text or "") if body is not None else None
        delay = xml.find("{%s}delay" % NS_DELAY)
        self.stamp = delay.get("stamp") if delay is not None else None
        self.ident = xml.get("id")
        self.mtype = xml.get("type") or "normal"
        self.raw = str(msg)

    def line(self, raw: bool) -> str:
        fields = [
            "MSG",
            self.sender,
            b64(self.body) if self.body else "-",
            self.stamp or "-",
            self.ident or "-",
            self.mtype,
        ]
        if raw:
            fields.append(b64(self.raw))
        return " ".join(fields)


class Client(slixmpp.ClientXMPP):
    def __init__(self, args):
        super().__init__(args.jid, args.password)
        self.args = args
        self.received: list[Received] = []
        self.printed = 0
        self.body_count = 0
        self.new_message = asyncio.Event()
        self.ready: asyncio.Future | None = None
        self.online = False

        self.register_plugin("xep_0030")
        self.register_plugin("xep_0203")
        self.register_plugin("xep_0297")
        self.register_plugin("xep_0059")
        self.register_plugin("xep_0313")
        if args.carbons:
            self.register_plugin("xep_0280")
        if args.sm:
            self.register_plugin("xep_0198")

        if args.plaintext:
            self.enable_direct_tls = False
            self.enable_starttls = False
            self.enable_plaintext = True
            mech = self.plugin["feature_mechanisms"]
            mech.unencrypted_plain = True
            mech.unencrypted_scram = True
            # Never upgrade, even if STARTTLS is offered; fail fast if the
            # server insists on it.
            self.unregister_feature("starttls", 0)
            self.register_feature("starttls", self._refuse_starttls, restart=False, order=0)
        else:
            self.enable_direct_tls = False
            self.enable_starttls = True
            self.enable_plaintext = False
            self.ca_certs = args.ca

        # Every <message>, with or without body (slixmpp's own "message"
        # event only fires for ones with a body).
        self.register_handler(
            Callback(
                "o2tr all messages",
                MatchXPath("{%s}message" % NS_CLIENT),
                self._on_any_message,
            )
        )
        self.add_event_handler("session_start", self._on_session_start)
        self.add_event_handler("failed_all_auth", self._on_failed_auth)
        self.add_event_handler("disconnected", self._on_disconnected)
        self.add_event_handler("connection_failed", self._on_connection_failed)

    # ------------------------------------------------------------ events
    def _fail_ready(self, reason: str) -> None:
        if self.ready is not None and not self.ready.done():
            self.ready.set_exception(RuntimeError(reason))

    def _refuse_starttls(self, features) -> bool:
        tls = features.xml.find("{urn:ietf:params:xml:ns:xmpp-tls}starttls")
        if tls is not None and tls.find("{urn:ietf:params:xml:ns:xmpp-tls}required") is not None:
            self._fail_ready("server requires STARTTLS but the client runs with --plaintext")
        return False

    def _on_failed_auth(self, _event) -> None:
        self._fail_ready("authentication failed")

    def _on_connection_failed(self, error) -> None:
        self._fail_ready("connection failed: %s" % (error,))

    def _on_disconnected(self, reason) -> None:
        self.online = False
        self._fail_ready("disconnected before ready: %s" % (reason,))

    def _on_any_message(self, msg) -> None:
        # MAM results are answers to MAM queries, not received messages.
        if msg.xml.find("{%s}result" % NS_MAM) is not None:
            return
        rec = Received(msg)
        self.received.append(rec)
        if rec.body:
            self.body_count += 1
        self.new_message.set()

    async def _on_session_start(self, _event) -> None:
        try:
            await self.get_roster(timeout=PRESENCE_ECHO_TIMEOUT)
            if self.args.before_presence:
                await self._send_before_presence(self.args.before_presence)
            echo = asyncio.get_running_loop().create_future()
            own = self.boundjid.full

            def on_presence(pres):
                if str(pres["from"]) == own and not echo.done():
                    echo.set_result(True)

            handler = Callback("o2tr presence echo", MatchXPath("{%s}presence" % NS_CLIENT), on_presence)
            self.register_handler(handler)
            try:
                self.send_presence()
                await asyncio.wait_for(echo, PRESENCE_ECHO_TIMEOUT)
            finally:
                self.remove_handler("o2tr presence echo")
            if self.args.carbons:
                await self.plugin["xep_0280"].enable(timeout=PRESENCE_ECHO_TIMEOUT)
            self.online = True
            if self.ready is not None and not self.ready.done():
                self.ready.set_result(own)
        except Exception as exc:  # noqa: BLE001 - reported to the driver
            self._fail_ready("session setup failed: %r" % (exc,))

    async def _send_before_presence(self, xml: str) -> None:
        """Send raw XML before the initial presence; an <iq> is answered
        first. The server need not have acted on a stanza when it reads the
        next one: ejabberd answers XEP-0013's disco#info in another process,
        which tells the session to keep offline storage by an Erlang message
        that can arrive after the presence (and the storage is flushed after
        all). The answer reaches the session after that message, so once the
        client has it the presence is safe."""
        try:
            el = ET.fromstring(xml)
        except ET.ParseError:
            el = None
        iq_id = el.get("id") if el is not None and el.tag in ("iq", "{%s}iq" % NS_CLIENT) else None
        if iq_id is None:
            self.send_raw(xml)
            return
        answered = asyncio.get_running_loop().create_future()

        def on_iq(iq):
            if iq["id"] == iq_id and iq["type"] in ("result", "error") and not answered.done():
                answered.set_result(True)

        self.register_handler(Callback("o2tr before presence", MatchXPath("{%s}iq" % NS_CLIENT), on_iq))
        try:
            self.send_raw(xml)
            await asyncio.wait_for(answered, PRESENCE_ECHO_TIMEOUT)
        finally:
            self.remove_handler("o2tr before presence")

    # ------------------------------------------------------------ actions
    async def login(self) -> str:
        self.ready = asyncio.get_running_loop().create_future()
        self.connect(self.args.host, self.args.port)
        try:
            return await asyncio.wait_for(asyncio.shield(self.ready), LOGIN_TIMEOUT)
        except asyncio.TimeoutError:
            self.cancel_connection_attempt()
            raise RuntimeError("login timed out after %s s" % LOGIN_TIMEOUT)
        except Exception:
            # No reconnection loop behind the test's back.
            self.cancel_connection_attempt()
            raise

    def build_message(self, to: str, body: str, flags: list[str]):
        msg = self.make_message(mto=to, mbody=body, mtype="normal" if "normal" in flags else "chat")
        msg["id"] = self.new_id()
        x = msg.xml
        if "subject" in flags:
            sub = ET.SubElement(x, "{%s}subject" % NS_CLIENT)
            sub.text = body
        if "xhtml" in flags:
            html = ET.SubElement(x, "{http://jabber.org/protocol/xhtml-im}html")
            hbody = ET.SubElement(html, "{http://www.w3.org/1999/xhtml}body")
            p = ET.SubElement(hbody, "{http://www.w3.org/1999/xhtml}p")
            p.text = body
        if "oob" in flags:
            oob = ET.SubElement(x, "{jabber:x:oob}x")
            url = ET.SubElement(oob, "{jabber:x:oob}url")
            url.text = "https://files.example.test/" + urllib.parse.quote(body)
            desc = ET.SubElement(oob, "{jabber:x:oob}desc")
            desc.text = body
        if "receipt" in flags:
            ET.SubElement(x, "{urn:xmpp:receipts}request")
        if "chatstate" in flags:
            ET.SubElement(x, "{http://jabber.org/protocol/chatstates}active")
        if "nostore" in flags:
            ET.SubElement(x, "{urn:xmpp:hints}no-store")
        if "nopermstore" in flags:
            ET.SubElement(x, "{urn:xmpp:hints}no-permanent-store")
        return msg

    async def wait_count(self, n: int, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.body_count < n:
            left = deadline - loop.time()
            if left <= 0:
                return False
            self.new_message.clear()
            try:
                await asyncio.wait_for(self.new_message.wait(), left)
            except asyncio.TimeoutError:
                return self.body_count >= n
        return True

    async def mam(self, with_jid: str | None) -> list[str]:
        iq = await self.plugin["xep_0313"].retrieve(
            with_jid=slixmpp.JID(with_jid) if with_jid else None,
            rsm={"max": 250},
            timeout=PRESENCE_ECHO_TIMEOUT,
        )
        lines = []
        for res in iq["mam"]["results"]:
            fwd = res["mam_result"]["forwarded"]
            inner = fwd["stanza"]
            body = inner["body"]
            lines.append(
                "MAMMSG %s %s %s %s"
                % (
                    str(inner["from"]) or "-",
                    str(inner["to"]) or "-",
                    b64(body) if body else "-",
                    b64(str(fwd)),
                )
            )
        return lines

    async def close(self, wait: float = 3.0) -> None:
        if self.transport is None:
            return
        fut = self.disconnect(wait=wait)
        try:
            await asyncio.wait_for(fut, wait + 2.0)
        except (asyncio.TimeoutError, Exception):  # noqa: BLE001
            self.abort()


async def handle(client: Client, line: str) -> bool:
    """Run one command; False means exit."""
    parts = line.split()
    if not parts:
        return True
    cmd, rest = parts[0].upper(), parts[1:]
    try:
        if cmd == "SEND":
            if len(rest) < 2:
                out("ERR usage: SEND <to> <b64 body> [flags]")
                return True
            flags = [f for chunk in rest[2:] for f in chunk.split(",") if f]
            unknown = set(flags) - {"xhtml", "oob", "subject", "receipt", "chatstate", "nostore", "nopermstore", "normal"}
            if unknown:
                out("ERR unknown flags %s" % ",".join(sorted(unknown)))
                return True
            if not client.online:
                out("ERR not connected")
                return True
            msg = client.build_message(rest[0], unb64(rest[1]), flags)
            msg.send()
            out("OK %s" % msg["id"])
        elif cmd == "SENDRAW":
            if len(rest) != 1 or client.transport is None:
                out("ERR usage: SENDRAW <b64 xml> (while connected)")
                return True
            client.send_raw(unb64(rest[0]))
            out("OK")
        elif cmd == "WAIT":
            if len(rest) != 2:
                out("ERR usage: WAIT <n> <timeout_s>")
                return True
            ok = await client.wait_count(int(rest[0]), float(rest[1]))
            out("OK %d" % client.body_count if ok else "ERR timeout %d" % client.body_count)
        elif cmd == "RECV":
            count = 0
            while client.printed < len(client.received):
                rec = client.received[client.printed]
                client.printed += 1
                if rec.body or client.args.raw:
                    out(rec.line(client.args.raw))
                    count += 1
            out("OK %d" % count)
        elif cmd == "COUNT":
            out("OK %d" % client.body_count)
        elif cmd == "MAM":
            if not client.online:
                out("ERR not connected")
                return True
            lines = await client.mam(rest[0] if rest else None)
            for ln in lines:
                out(ln)
            out("OK %d" % len(lines))
        elif cmd == "ROSTER":
            # The roster slixmpp fetched at session start (plus pushes).
            roster = client.client_roster
            jids = sorted(str(j) for j in roster)
            for j in jids:
                out("ROSTERITEM %s %s" % (j, roster[j]["subscription"]))
            out("OK %d" % len(jids))
        elif cmd == "UNROSTER":
            # Remove a contact (roster set, subscription=remove); waits for the answer.
            await client.del_roster_item(rest[0])
            out("OK")
        elif cmd == "PRESENCE":
            client.send_presence()
            out("OK")
        elif cmd == "STATUS":
            out("OK connected %s" % client.boundjid.full if client.online else "OK disconnected")
        elif cmd == "CLOSE":
            await client.close()
            client.online = False
            out("OK")
        elif cmd == "ABORT":
            client.abort()
            client.online = False
            out("OK")
        elif cmd == "CONNECT":
            if client.transport is not None:
                out("ERR already connected")
                return True
            jid = await client.login()
            out("OK %s" % jid)
        elif cmd == "QUIT":
            await client.close(wait=2.0)
            out("OK")
            return False
        else:
            out("ERR unknown command %s" % cmd)
    except Exception as exc:  # noqa: BLE001 - the driver gets the reason
        out("ERR %s: %s" % (type(exc).__name__, str(exc).replace("\n", " ")))
    return True


def stdin_reader(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
    for line in sys.stdin:
        loop.call_soon_threadsafe(queue.put_nowait, line.rstrip("\r\n"))
    loop.call_soon_threadsafe(queue.put_nowait, None)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jid", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--ca", help="CA certificate (PEM) to trust for STARTTLS")
    ap.add_argument("--plaintext", action="store_true", help="no TLS (only for a proxy on loopback)")
    ap.add_argument("--raw", action="store_true", help="RECV lists every message stanza with its XML")
    ap.add_argument("--carbons", action="store_true", help="enable XEP-0280 carbons")
    ap.add_argument("--sm", action="store_true", help="enable XEP-0198 stream management")
    ap.add_argument("--debug", action="store_true", help="slixmpp debug log on stderr")
    ap.add_argument("--before-presence", help="raw XML to send before the initial presence")
    args = ap.parse_args()
    if not args.plaintext and not args.ca:
        out("ERR --ca is required unless --plaintext")
        return 2

    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    loop = asyncio.get_running_loop()
    client = Client(args)
    try:
        jid = await client.login()
    except Exception as exc:  # noqa: BLE001
        out("ERR %s" % str(exc).replace("\n", " "))
        client.abort()
        return 2
    out("READY %s" % jid)

    queue: asyncio.Queue = asyncio.Queue()
    threading.Thread(target=stdin_reader, args=(loop, queue), daemon=True).start()
    while True:
        line = await queue.get()
        if line is None:
            # The driver went away: leave quickly.
            await client.close(wait=1.0)
            return 0
        if not await handle(client, line):
            return 0


if __name__ == "__main__":
    try:
        code = asyncio.run(main())
    except KeyboardInterrupt:
        code = 130
    sys.stdout.flush()
    # Daemon stdin thread may still block on read: exit hard.
    import os

    os._exit(code)
