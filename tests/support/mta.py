"""Real mail servers, Postfix and Exim, each in its own Debian root file system (`make test-mta`).

scripts/rootfs.py builds and caches `mta-postfix-trixie-<arch>` and `mta-exim-trixie-<arch>`
(the MTA installed, not configured). A `ChrootMta` runs one of them in the foreground, as a
child of the test fixture:

- the cached root file system is the lower layer of an overlay whose upper layer is the test's
  own directory, so the cache is never written to, every session starts from a clean spool,
  and the test writes the configuration into the upper layer before the start and reads the
  delivered mail and the logs back from it;
- the overlay, /proc and /dev are mounted in a private mount namespace (`unshare --mount`),
  so they vanish with the MTA's processes however they end; those run in a session of their
  own, and `stop` signals that whole process group (SIGTERM, then SIGKILL);
- the chroot shares the host's network: the MTA listens on 127.0.0.1 on a free port.

Both deliver every accepted message for example.com into one Maildir, which `delivered()`
reads back by Message-ID.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

from lambda_sandbox import rootfs_script
from servers import LOOPBACK, TlsFiles, free_port

DOMAIN = "example.com"
# Accepted: user<N>@example.com. Any other local part of example.com is unknown.
UNKNOWN_RECIPIENT = f"nobody@{DOMAIN}"
# Postfix refuses this envelope sender (check_sender_access, answered at RCPT).
REFUSED_SENDER = "refused@example.net"
# Exim defers this sender's messages past RATE_LIMIT an hour (a ratelimit ACL at MAIL).
RATE_LIMITED_SENDER = "burst@example.net"
RATE_LIMIT = 3
MESSAGE_SIZE_LIMIT = 1024 * 1024
# Postfix drops a client idle this long with "421 4.4.2 ... Error: timeout exceeded".
POSTFIX_IDLE_TIMEOUT = 3
START_WITHIN = 60.0
QUIET_WITHIN = 30.0

# What each MTA logs when a client breaks the protocol (matched in the log lines written
# during a test). Every pattern is a line the MTA writes only for a client that misbehaved:
POSTFIX_COMPLAINTS = (
    # smtpd_forbid_unauth_pipelining: a command sent ahead where RFC 2920 forbids it.
    "improper command pipelining",
    # the client hung up mid-session, without QUIT (or mid-transaction).
    "lost connection after",
    # a TLS handshake that failed on the server's side.
    "SSL_accept error",
    # something that is not an SMTP command where one was due (a body sent too early).
    "non-SMTP command",
    # a command or argument the server could not parse.
    "syntax error",
)
EXIM_COMPLAINTS = (
    # a command sent ahead of a reply where PIPELINING does not allow it.
    "SMTP protocol synchronization error",
    # an out-of-sequence or malformed command (e.g. a BDAT/DATA mix-up).
    "SMTP protocol violation",
    # the client hung up without QUIT, during a command or a message.
    "unexpected disconnection",
    "lost while reading message data",
    # too many unrecognised commands, or a syntax error in one.
    "SMTP syntax error",
    "unrecognized command",
)

# Run by /bin/sh inside `unshare --mount`: the overlay, /proc and /dev, then the MTA.
_CHROOT_SCRIPT = r"""
set -e
lower=$1 upper=$2 work=$3 root=$4
shift 4
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$work" "$root"
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
exec chroot "$root" "$@"
"""


class ChrootMta:
    """One MTA in its cached root file system, started and stopped by the test."""

    name = "mta"
    complaints: tuple[str, ...] = ()
    log_files: tuple[str, ...] = ()
    maildir = "var/mail/example.com"

    def __init__(self, rootfs: Path, workdir: Path, tls: TlsFiles | None = None) -> None:
        self.rootfs = rootfs
        self.upper = workdir / "upper"
        self.work = workdir / "work"
        self.root = workdir / "root"
        self.output = workdir / f"{self.name}.out"
        self.tls = tls
        self.host = LOOPBACK
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._namespace: str | None = None

    # ------------------------------------------------------------ set-up, by the subclass

    def configure(self) -> None:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def queued(self) -> int:
        """Messages still in the MTA's queue (not yet delivered)."""
        raise NotImplementedError

    def write(self, path: str, text: str, mode: int = 0o644) -> Path:
        """Write a file into the upper layer: the MTA sees it at /`path`."""
        target = self.upper / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)
        return target

    # ------------------------------------------------------------ life cycle

    def start(self) -> None:
        for directory in (self.upper, self.work, self.root):
            directory.mkdir(parents=True, exist_ok=True)
        self.configure()
        unshare = shutil.which("unshare")
        if unshare is None:
            raise RuntimeError("unshare (util-linux) is missing")
        command = [unshare, "--mount", "--propagation", "private", "/bin/sh", "-c"]
        args = [str(self.rootfs), str(self.upper), str(self.work), str(self.root)]
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
        with self.output.open("wb") as out:
            self._process = subprocess.Popen(
                [*command, _CHROOT_SCRIPT, "sh", *args, *self.command()],
                env={**env, "LC_ALL": "C"},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_for_greeting()
            # The leader runs in the namespace by now (it answered through the MTA).
            self._namespace = os.readlink(f"/proc/{self._process.pid}/ns/mnt")
            if self._namespace == os.readlink("/proc/self/ns/mnt"):
                raise RuntimeError(f"{self.name} runs in this process's mount namespace")
        except BaseException:
            self.stop()
            raise

    def _wait_for_greeting(self) -> None:
        deadline = time.monotonic() + START_WITHIN
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start:\n{self.diagnostics()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=5) as sock:
                    if sock.makefile("rb").readline().startswith(b"220"):
                        sock.sendall(b"QUIT\r\n")
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not greet:\n{self.diagnostics()}")
            time.sleep(0.2)

    def _namespace_members(self) -> list[int]:
        """Every process in the MTA's mount namespace: its daemons may leave our process
        group (Postfix's master calls setsid), never the namespace."""
        if self._namespace is None:
            return []
        members = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.readlink(entry / "ns" / "mnt") == self._namespace:
                    members.append(int(entry.name))
            except OSError:  # gone meanwhile
                continue
        return members

    def stop(self) -> None:
        """SIGTERM to every process of the MTA (its namespace), then SIGKILL to those left;
        the mounts vanish with the last of them."""
        process = self._process
        if process is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            for pid in self._namespace_members():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and (
                process.poll() is None or self._namespace_members()
            ):
                time.sleep(0.1)
            if process.poll() is not None and not self._namespace_members():
                break
        process.wait(timeout=15)
        self._process = None

    def __enter__(self) -> ChrootMta:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ what the test reads

    def log(self) -> str:
        return "".join(
            (self.upper / name).read_text(errors="replace")
            for name in self.log_files
            if (self.upper / name).exists()
        )

    def log_mark(self) -> dict[str, int]:
        """Where each log ends now: `log_since` reads what comes after."""
        sizes = {}
        for name in self.log_files:
            path = self.upper / name
            sizes[name] = path.stat().st_size if path.exists() else 0
        return sizes

    def log_since(self, mark: dict[str, int]) -> str:
        text = []
        for name in self.log_files:
            path = self.upper / name
            if path.exists():
                with path.open("rb") as handle:
                    handle.seek(mark.get(name, 0))
                    text.append(handle.read().decode(errors="replace"))
        return "".join(text)

    def wait_for_log(self, mark: dict[str, int], text: str, within: float) -> None:
        """Wait until a line with `text` is logged after `mark` (fails after `within` s)."""
        deadline = time.monotonic() + within
        while text not in self.log_since(mark):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} never logged {text!r}:\n{self.diagnostics()}")
            time.sleep(0.1)

    def complaints_since(self, mark: dict[str, int]) -> list[str]:
        """The log lines written since `mark` that say a client broke the protocol."""
        return [
            line
            for line in self.log_since(mark).splitlines()
            if any(pattern.lower() in line.lower() for pattern in self.complaints)
        ]

    def delivered(self) -> Counter[str]:
        """How many times each Message-ID arrived in the Maildir."""
        found: Counter[str] = Counter()
        new = self.upper / self.maildir / "new"
        cur = self.upper / self.maildir / "cur"
        for directory in (new, cur):
            if not directory.is_dir():
                continue
            for path in directory.iterdir():
                parsed = email.message_from_bytes(path.read_bytes(), policy=email.policy.SMTP)
                found[str(parsed["Message-ID"])] += 1
        return found

    def open_connections(self) -> int:
        """Server-side TCP connections on the MTA's port not yet closed by the MTA."""
        count = 0
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            local, state = fields[1], fields[3]
            port = int(local.split(":")[1], 16)
            # 0A: LISTEN, 06: TIME_WAIT (already closed by both ends).
            if port == self.port and state not in ("0A", "06"):
                count += 1
        return count

    def quiet(self, within: float = QUIET_WITHIN) -> None:
        """Wait until the MTA has closed every connection and delivered every message, so
        that its logs and the Maildir are final (fails after `within` seconds)."""
        deadline = time.monotonic() + within
        while self.open_connections() or self.queued() or not self._logs_settled():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not settle:\n{self.diagnostics()}")
            time.sleep(0.1)

    def _logs_settled(self) -> bool:
        return True

    def diagnostics(self) -> str:
        output = self.output.read_text(errors="replace") if self.output.exists() else ""
        return f"--- output\n{output}\n--- log\n{self.log()[-6000:]}"


class Postfix(ChrootMta):
    """Postfix with STARTTLS (the test's private CA), smtpd_forbid_unauth_pipelining, a size
    limit, unknown recipients rejected, one refused sender and a short idle timeout."""

    name = "postfix"
    complaints = POSTFIX_COMPLAINTS
    log_files = ("var/log/postfix.log",)

    def configure(self) -> None:
        assert self.tls is not None, "Postfix offers STARTTLS: it needs the test's TLS files"
        self.write("etc/postfix/tls/server.pem", self.tls.cert.read_text())
        self.write("etc/postfix/tls/server.key", self.tls.key.read_text(), 0o600)
        self.write(
            "etc/postfix/main.cf",
            f"""\
compatibility_level = 3.10
myhostname = mta.test
mydestination =
inet_interfaces = {LOOPBACK}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
maillog_file = /var/log/postfix.log
alias_maps =
alias_database =
biff = no
smtpd_banner = $myhostname ESMTP
virtual_mailbox_domains = {DOMAIN}
virtual_mailbox_base = /var/mail
virtual_mailbox_maps = regexp:/etc/postfix/vmailbox
virtual_uid_maps = static:65534
virtual_gid_maps = static:65534
message_size_limit = {MESSAGE_SIZE_LIMIT}
smtpd_timeout = {POSTFIX_IDLE_TIMEOUT}s
smtpd_forbid_unauth_pipelining = yes
smtpd_sender_restrictions = check_sender_access regexp:/etc/postfix/sender_access
smtpd_tls_security_level = may
smtpd_tls_cert_file = /etc/postfix/tls/server.pem
smtpd_tls_key_file = /etc/postfix/tls/server.key
smtpd_tls_loglevel = 1
""",
        )
        self.write("etc/postfix/vmailbox", f"/^user[0-9]+@{re.escape(DOMAIN)}$/ {DOMAIN}/\n")
        self.write(
            "etc/postfix/sender_access",
            f"/^{re.escape(REFUSED_SENDER)}$/ 553 5.7.1 refused by policy\n",
        )
        # Every service out of Postfix's own chroot (this whole tree is one already).
        self.write(
            "etc/postfix/master.cf",
            f"""\
{LOOPBACK}:{self.port} inet n - n - - smtpd
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
proxywrite unix - - n - 1 proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
local     unix  - n n - - local
virtual   unix  - n n - - virtual
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
""",
        )
        mail = self.upper / "var" / "mail"
        mail.mkdir(parents=True, exist_ok=True)
        mail.chmod(0o1777)
        (self.upper / "var" / "log").mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        return ["/usr/sbin/postfix", "-c", "/etc/postfix", "start-fg"]

    def queued(self) -> int:
        spool = self.upper / "var" / "spool" / "postfix"
        return sum(
            1
            for queue in ("incoming", "active", "deferred", "maildrop")
            if (spool / queue).is_dir()
            for path in (spool / queue).rglob("*")
            if path.is_file()
        )

    def _logs_settled(self) -> bool:
        """postlogd writes asynchronously: every "connect from" has its "disconnect from"."""
        log = self.log()
        return len(re.findall(r"\]: connect from", log)) == log.count("]: disconnect from")


class Exim(ChrootMta):
    """Exim advertising PIPELINING and CHUNKING, with a size limit, unknown recipients
    rejected and a ratelimit ACL that defers one sender with 451."""

    name = "exim"
    complaints = EXIM_COMPLAINTS
    log_files = ("var/log/exim4/mainlog", "var/log/exim4/rejectlog", "var/log/exim4/paniclog")

    def configure(self) -> None:
        self.write(
            "etc/exim4/exim4.conf",
            rf"""
primary_hostname = mta.test
keep_environment =
domainlist local_domains = {DOMAIN}
daemon_smtp_ports = {self.port}
local_interfaces = {LOOPBACK}
disable_ipv6 = true
log_file_path = /var/log/exim4/%slog
log_selector = +smtp_connection +smtp_protocol_error +smtp_syntax_error +pipelining
message_size_limit = {MESSAGE_SIZE_LIMIT}
# Deliver every message at once, however many one connection brings (the default queues
# them past 10).
smtp_accept_queue_per_connection = 0
pipelining_advertise_hosts = *
chunking_advertise_hosts = *
tls_advertise_hosts =
host_lookup =
rfc1413_hosts =
exim_user = Debian-exim
exim_group = Debian-exim
never_users = root
spool_directory = /var/spool/exim4
acl_smtp_mail = acl_check_mail
acl_smtp_rcpt = acl_check_rcpt

begin acl

acl_check_mail:
  defer   senders = {RATE_LIMITED_SENDER}
          ratelimit = {RATE_LIMIT} / 1h / per_mail / $sender_address
          message = 451 4.7.1 Sender over its hourly allowance, try again later
  accept

acl_check_rcpt:
  accept  hosts = :
  deny    domains = !+local_domains
          message = 550 5.7.1 Relaying denied
  require verify = recipient
  accept

begin routers

maildir_user:
  driver = accept
  domains = +local_domains
  condition = ${{if match{{$local_part}}{{\N^user[0-9]+$\N}}}}
  transport = maildir_delivery
  cannot_route_message = 550 5.1.1 User unknown

begin transports

maildir_delivery:
  driver = appendfile
  directory = /var/mail/{DOMAIN}
  maildir_format
  create_directory
  user = Debian-exim
  group = Debian-exim
  mode = 0644

begin retry
*   *   F,1h,1m

begin rewrite
""",
        )
        mail = self.upper / "var" / "mail"
        mail.mkdir(parents=True, exist_ok=True)
        mail.chmod(0o1777)

    def command(self) -> list[str]:
        # -bdf: the daemon in the foreground; each accepted message is delivered at once. The
        # configuration is where Debian's exim4 looks first, not given with -C (which would
        # make every delivery process drop its privilege).
        return ["/usr/sbin/exim4", "-bdf"]

    def queued(self) -> int:
        spool = self.upper / "var" / "spool" / "exim4" / "input"
        if not spool.is_dir():
            return 0
        return sum(1 for path in spool.rglob("*-H"))


MTAS = {"postfix": Postfix, "exim": Exim}


def mta_rootfs(name: str) -> Path:
    """The cached root file system for `name` (built by scripts/rootfs.py if missing)."""
    path: Path = rootfs_script().ensure_mta(name)
    return path
