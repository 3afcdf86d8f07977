"""A registrar-style UDP responder: sansio_sip.Engine driven by plain asyncio. It answers
OPTIONS, and REGISTER with a digest challenge then 200 OK, as kx-sipd does. Usage:
asyncio_registrar.py [HOST] [PORT] (0: a free port); prints "listening on HOST:PORT"."""

import asyncio
import os
import sys
import time

import sansio_sip as sip

REALM = "example.test"
HA1 = sip.compute_ha1("alice", REALM, "wonderland")  # stores keep HA1s, never passwords
ACCOUNTS = {"alice": sip.Account(username="alice", ha1={"MD5": HA1})}


class Registrar(asyncio.DatagramProtocol):
    timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport):
        self.transport, self.loop = transport, asyncio.get_running_loop()

    def datagram_received(self, data, source):
        self.feed(self.engine.receive, data, source=source[:2], transport=sip.Transport.UDP)

    def feed(self, method, *args, deadline=0.0, **kwargs):
        now = max(self.loop.time(), deadline)  # the loop's clock is monotonic, as `now` must be
        self.perform(method(*args, now=now, wall=time.time(), **kwargs))

    def perform(self, actions):
        for action in actions:
            match action:
                case sip.Send(data=data, destination=destination):
                    self.transport.sendto(data, destination)
                case sip.LookupAccount(token=token, username=name):  # slow store? use a thread
                    self.feed(self.engine.account_found, token, ACCOUNTS.get(name))
                case sip.Log(level=level, event=event, fields=fields):
                    print(level, event, dict(fields), flush=True)
        if self.timer is not None:  # re-arm for the engine's next deadline
            self.timer.cancel()
        if (deadline := self.engine.next_timer()) is not None:
            self.timer = self.loop.call_at(deadline, self.timer_fired, deadline)

    def timer_fired(self, deadline):
        self.feed(self.engine.handle_timer, deadline=deadline)


async def main(host="127.0.0.1", port=5060):
    loop = asyncio.get_running_loop()
    transport, registrar = await loop.create_datagram_endpoint(Registrar, local_addr=(host, port))
    address = transport.get_extra_info("sockname")[:2]
    config = sip.EngineConfig(realm=REALM, nonce_secret=os.urandom(32), sip_address=address)
    registrar.engine = sip.Engine(config, entropy=os.urandom)
    print("listening on {}:{}".format(*address), flush=True)
    await asyncio.Event().wait()  # serve until killed


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:2], *map(int, sys.argv[2:3])))
