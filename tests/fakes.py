"""A fake host for unit tests of drivers that run commands: files kept in memory, every argv
(and stdin) recorded as a process list would show it, and Postfix tools that answer like a
real Postfix whose system /etc/postfix/main.cf is missing unless `-c DIR` names the instance.
Each test module subclasses it with the commands its driver runs (`answer`)."""

from __future__ import annotations

import posixpath
from collections.abc import Mapping

from reconciler.transport import CommandResult, Transport

# Every program of the Postfix suite that reads main.cf (and so takes -c).
POSTFIX_SUITE = frozenset({"postconf", "postmap", "postfix", "postqueue", "postsuper",
                           "postalias", "postcat", "postdrop", "postkick", "postlock",
                           "postlog", "postmulti", "sendmail", "mailq", "newaliases"})


def ok(argv: tuple[str, ...], out: str = "") -> CommandResult:
    return CommandResult(argv, 0, out.encode(), b"")


def fail(argv: tuple[str, ...], status: int = 1, err: bytes = b"") -> CommandResult:
    return CommandResult(argv, status, b"", err)


def no_main_cf(program: str) -> bytes:
    return f"{program}: fatal: open /etc/postfix/main.cf: No such file or directory\n".encode()


class FakeHost(Transport):
    """A host whose only Postfix instance lives in `config_dir`."""

    def __init__(self, name: str, config_dir: str, files: Mapping[str, bytes]) -> None:
        super().__init__(name)
        self.config_dir = config_dir
        self.argvs: list[tuple[str, ...]] = []  # raw, as `ps` would show them
        self.stdin: list[bytes] = []
        self.files: dict[str, bytes] = dict(files)

    def close(self) -> None:
        pass

    def _read(self, path: str) -> bytes | None:
        return self.files.get(path)

    def _write_atomic(self, path: str, data: bytes, mode: int, backup: bool) -> None:
        if backup and path in self.files:
            self.files[path + ".bak"] = self.files[path]
        self.files[path] = data

    def _run(self, argv: tuple[str, ...], input: bytes | None, timeout: float) -> CommandResult:
        self.argvs.append(argv)
        if input is not None:
            self.stdin.append(input)
        program = posixpath.basename(argv[0])
        if program in POSTFIX_SUITE and argv[1:3] != ("-c", self.config_dir):
            return fail(argv, 1, no_main_cf(program))  # what a real Postfix answers here
        return self.answer(program, argv, input)

    def answer(self, program: str, argv: tuple[str, ...], input: bytes | None) -> CommandResult:
        raise AssertionError(f"unexpected command {argv}")

    def postfix_argvs(self) -> list[tuple[str, ...]]:
        return [argv for argv in self.argvs if posixpath.basename(argv[0]) in POSTFIX_SUITE]

    def assert_every_postfix_command_names_the_instance(self) -> None:
        for argv in self.postfix_argvs():
            assert argv[1:3] == ("-c", self.config_dir), (
                f"{' '.join(argv)}: no -c {self.config_dir}")
