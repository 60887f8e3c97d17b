"""A stage's exception on its way to the user: described safely, rebuilt without pickle."""

from __future__ import annotations

import pickle
import threading
from pathlib import Path

import msgpack
import pytest
import zmq
from test_launcher import free_ports

import zpipe
from zpipe.api.pipeline import raise_failure
from zpipe.config import PipelineSpec, StageSpec
from zpipe.replica import failures
from zpipe.replica.failures import Failure
from zpipe.supervision.processes import Remote
from zpipe.supervision.supervisor import Supervisor
from zpipe.wire import protocol
from zpipe.wire.codec import PROTOCOL_VERSION


class BrokenStr(Exception):
    def __str__(self):
        raise RuntimeError("no text for you")


class Custom(Exception):
    def __init__(self, code, detail):
        super().__init__(code, detail)
        self.code = code


class NeedsKeyword(Exception):
    def __init__(self, *, reason):
        super().__init__(f"because {reason}")


# -- describe (the replica's side) --------------------------------------------------

def test_describe_survives_an_exception_whose_str_raises():
    fields = failures.describe(BrokenStr("x"))
    assert fields["exc_type"] == "test_failures.BrokenStr"
    assert "str() of the BrokenStr failed with RuntimeError" in fields["message"]
    protocol.pack(protocol.ERROR, **fields)  # it travels


def test_describe_escapes_text_that_utf8_cannot_carry():
    try:
        raise ValueError("bad \ud800 value")
    except ValueError as exc:
        fields = failures.describe(exc)
    assert fields["message"] == "bad \\ud800 value"
    assert fields["args"] is None  # args that cannot travel are left out, the text is not
    kind, received = protocol.unpack(protocol.pack(protocol.ERROR, **fields))
    assert received["message"] == "bad \\ud800 value"


def test_describe_bounds_the_text():
    fields = failures.describe(ValueError("x" * 10**6))
    assert len(fields["message"]) < failures.MAX_TEXT + 100
    assert fields["args"] is None


def test_args_travel_when_msgpack_carries_them():
    fields = failures.describe(Custom(7, {"k": [1, 2]}))
    assert fields["args"] == [7, {"k": [1, 2]}]
    assert fields["exc_module"] == "test_failures" and fields["exc_qualname"] == "Custom"


# -- rebuild (the caller's side) -----------------------------------------------------

def _failure(exc: BaseException) -> Failure:
    fields = failures.describe(exc)
    kind, fields = protocol.unpack(protocol.pack(protocol.ERROR, **fields))
    return Failure("stage", "stage-1", "error", message=fields["message"],
                   exc_type=fields["exc_type"], traceback=fields["traceback"],
                   exc_module=fields["exc_module"], exc_qualname=fields["exc_qualname"],
                   args=fields["args"])


def test_rebuild_gives_the_same_type_args_and_attributes():
    exc = failures.rebuild(_failure(Custom(7, "seven")))
    assert type(exc) is Custom and exc.args == (7, "seven") and exc.code == 7
    assert exc.stage == "stage" and exc.replica == 1
    key = failures.rebuild(_failure(KeyError("k")))
    assert type(key) is KeyError and key.args == ("k",)
    missing = failures.rebuild(_failure(FileNotFoundError(2, "gone")))
    assert type(missing) is FileNotFoundError and missing.errno == 2


def test_rebuild_keeps_the_type_when_its_init_wants_other_arguments():
    exc = failures.rebuild(_failure(NeedsKeyword(reason="tests")))
    assert type(exc) is NeedsKeyword and str(exc) == "because tests"


def test_a_class_that_cannot_be_found_again_becomes_a_stage_error():
    class Local(Exception):
        pass
    exc = failures.rebuild(_failure(Local("inside a function")))
    assert type(exc) is zpipe.StageError and "Local: inside a function" in str(exc)


@pytest.mark.parametrize("module, qualname", [
    ("builtins", "SystemExit"), ("builtins", "KeyboardInterrupt"), ("os", "system"),
    ("no_such_module_anywhere", "Error"), ("builtins", "int"), ("", ""),
])
def test_only_exception_classes_are_rebuilt(module, qualname):
    failure = Failure("s", "s-0", "error", message="m", exc_type=f"{module}.{qualname}",
                      exc_module=module, exc_qualname=qualname, args=["ls"])
    assert type(failures.rebuild(failure)) is zpipe.StageError


class Payload:
    """Unpickling this touches a file: what a forged report could have done."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_forged_error_report_runs_no_code(tmp_path):
    """With a tcp control address and no keys anyone may connect and send an ERROR:
    nothing in it is unpickled, whatever fields it carries."""
    touched = tmp_path / "touched"
    port = free_ports(1)[0]
    address = f"tcp://127.0.0.1:{port}"
    spec = PipelineSpec(name="p", stages=(StageSpec(name="src", run="m:f"),), grace=1)
    ctx = zmq.Context()
    supervisor = Supervisor(spec, address, Remote(), lambda text: None, ctx=ctx)
    forger = ctx.socket(zmq.DEALER)
    forger.setsockopt(zmq.IDENTITY, b"src-0")
    forger.setsockopt(zmq.LINGER, 0)
    forger.connect(address)
    payload = pickle.dumps(Payload(touched))
    forger.send(protocol.pack(protocol.HELLO, pid=1, host="h", version=PROTOCOL_VERSION))
    forger.send(msgpack.packb([PROTOCOL_VERSION, "error", {"exc_type": "x", "message": "forged",
                                            "exception": payload, "args": [payload],
                                            "exc_module": "pathlib", "exc_qualname": "Path"}],
                              use_bin_type=True))
    result: list = []
    runner = threading.Thread(target=lambda: result.append(supervisor.run()))
    runner.start()
    runner.join(30)
    forger.close()
    ctx.term()
    assert result, "the supervisor did not finish"
    with pytest.raises(zpipe.StageError, match="forged"):
        raise_failure(result[0])
    assert not touched.exists()


# -- end to end ------------------------------------------------------------------------

def numbers(count):
    yield from range(count)


def raise_broken(x):
    raise BrokenStr("x")


def raise_surrogate(x):
    raise ValueError("bad \ud800 value")


def produce_surrogate(x):
    return "item \udcff"


def discard(x):
    pass


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_an_exception_whose_str_raises_still_reaches_the_caller(mode):
    with pytest.raises(BrokenStr) as info:
        zpipe.run([zpipe.Task(numbers, params={"count": 3}), zpipe.Task(raise_broken),
                   zpipe.Task(discard)], mode=mode)
    assert "raise BrokenStr" in info.value.remote_traceback


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_text_utf8_cannot_carry_is_reported_not_lost(mode):
    with pytest.raises(ValueError, match=r"bad \\ud800 value") as info:
        zpipe.run([zpipe.Task(numbers, params={"count": 3}), zpipe.Task(raise_surrogate),
                   zpipe.Task(discard)], mode=mode)
    assert info.value.stage == "raise_surrogate"
    with pytest.raises(zpipe.EncodeError, match=r"stage|item of type str") as info:
        zpipe.run([zpipe.Task(numbers, params={"count": 3}), zpipe.Task(produce_surrogate),
                   zpipe.Task(discard)], mode=mode)
    assert info.value.stage == "produce_surrogate"


def test_launch_reports_an_unencodable_message_with_stage_and_type(project):
    project.pipeline("""
        [pipeline]
        name = "surrogates"
        [[stages]]
        name = "source"
        run = "stages:numbers"
        params = { count = 3 }
        [[stages]]
        name = "relay"
        run = "stages:bad"
        [[stages]]
        name = "sink"
        run = "stages:sink"
    """, """
        def numbers(count):
            yield from range(count)

        def bad(x):
            raise ValueError("bad \\ud800 value")

        def sink(x):
            pass
    """)
    result = project.launch(timeout=60)
    assert result.returncode == 1
    assert "stage 'relay' replica relay-0 failed while processing an item of type int: " \
           "ValueError: bad \\ud800 value" in result.stderr
    assert "died without a word" not in result.stderr
