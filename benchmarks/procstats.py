"""What a benchmark reads of the daemon process from /proc: CPU, RSS, descriptors, sockets."""

from __future__ import annotations

import os
from collections.abc import Iterator


def rss_mb(pid: int) -> float:
    """Resident set size in MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time consumed so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_fds(pid: int) -> int:
    """Open file descriptors."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def _fd_targets(pid: int) -> Iterator[str]:
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            yield os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue


def _socket_inodes(pid: int) -> set[str]:
    return {t[8:-1] for t in _fd_targets(pid) if t.startswith("socket:[")}


def _sockets(protocol: str) -> Iterator[tuple[str, int, int]]:
    """(inode, local port, remote port) of every IPv4/IPv6 socket of ``protocol`` (tcp, udp)."""
    for table in (f"/proc/net/{protocol}", f"/proc/net/{protocol}6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    yield cols[9], int(cols[1].rsplit(":", 1)[1], 16), int(cols[2].rsplit(":", 1)[1], 16)
        except OSError:
            continue


def udp_ports(pid: int) -> list[int]:
    """Local ports of the UDP sockets the process holds (SIP and RTP/RTCP)."""
    inodes = _socket_inodes(pid)
    return sorted(local for inode, local, _ in _sockets("udp") if inode in inodes)


def tcp_remote_ports(pid: int) -> list[int]:
    """Remote ports of the process's TCP sockets (0 for listening sockets)."""
    inodes = _socket_inodes(pid)
    return sorted(remote for inode, _, remote in _sockets("tcp") if inode in inodes)


def fd_kinds(pid: int) -> dict[str, int]:
    """Open descriptors by kind: TCP and UDP sockets, other sockets, files, pipes, others."""
    tcp = {inode for inode, _, _ in _sockets("tcp")}
    udp = {inode for inode, _, _ in _sockets("udp")}
    kinds: dict[str, int] = {}
    for target in _fd_targets(pid):
        if target.startswith("socket:["):
            inode = target[8:-1]
            kind = "tcp" if inode in tcp else "udp" if inode in udp else "socket"
        elif target.startswith("pipe:"):
            kind = "pipe"
        elif target.startswith("/"):
            kind = "file"
        else:
            kind = target.split(":", 1)[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds
