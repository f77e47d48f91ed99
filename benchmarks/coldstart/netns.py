"""A network namespace reached from the host over a veth pair whose namespace end is shaped with tbf: what the
namespace sends (a registry's responses) leaves at ``rate``.  Made with pyroute2; :meth:`ShapedNetns.close`
deletes the veth pair (its host end is the only thing created outside the namespace) and the namespace."""

from __future__ import annotations

import os
import re
from types import TracebackType

from pyroute2 import IPRoute, NetNS, netns

_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}


def rate_bits(rate: str) -> int:
    """``200mbit`` → 200_000_000 (bits/s); tc's unit names (bit, kbit, mbit, gbit)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?bit)", rate.strip().lower())
    if m is None:
        raise ValueError(f"rate {rate!r}: give a number and bit, kbit, mbit or gbit (e.g. 200mbit)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


class ShapedNetns:
    """Namespace ``name`` with the veth end :attr:`ns_addr`; the host end is :attr:`host_addr`."""

    def __init__(self, rate: str, tag: str | None = None) -> None:
        tag = tag or str(os.getpid() % 100000)
        self.rate = rate_bits(rate)
        self.name = f"nydus-coldstart-{tag}"
        self.host_if, self.ns_if = f"csh{tag}"[:15], f"csn{tag}"[:15]
        subnet = int(tag) % 250 if tag.isdigit() else 1
        self.host_addr, self.ns_addr = f"10.213.{subnet}.1", f"10.213.{subnet}.2"

    def __enter__(self) -> ShapedNetns:
        netns.create(self.name)
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def _setup(self) -> None:
        with IPRoute() as ip:
            ip.link("add", ifname=self.host_if, kind="veth", peer={"ifname": self.ns_if, "net_ns_fd": self.name})
            index = ip.link_lookup(ifname=self.host_if)[0]
            ip.addr("add", index=index, address=self.host_addr, prefixlen=30)
            ip.link("set", index=index, state="up")
        with NetNS(self.name) as ns:
            for ifname in ("lo", self.ns_if):
                ns.link("set", index=ns.link_lookup(ifname=ifname)[0], state="up")
            index = ns.link_lookup(ifname=self.ns_if)[0]
            ns.addr("add", index=index, address=self.ns_addr, prefixlen=30)
            burst = max(self.rate // 8 // 100, 64 << 10)  # 10 ms worth of bytes, at least 64 KiB
            ns.tc("add", "tbf", index=index, handle="1:", rate=f"{self.rate}bit", burst=burst, latency="50ms")

    def close(self) -> None:
        with IPRoute() as ip:
            found = ip.link_lookup(ifname=self.host_if)
            if found:
                ip.link("del", index=found[0])  # its peer in the namespace goes with it
        if self.name in netns.listnetns():
            netns.remove(self.name)

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
