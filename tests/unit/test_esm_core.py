"""SQS event source mappings, pure (core/esm.py): Lambda's setting rules, the states, the
batchItemFailures rules, and the poller's decisions fed event by event."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from cellcloud.core import esm


def _settings(**kw: Any) -> esm.Settings:
    base: dict[str, Any] = {"batch_size": None, "window_s": None, "response_types": None,
                            "scaling": None, "fifo": False}
    return esm.check_settings(**{**base, **kw})


def test_settings_follow_lambdas_rules() -> None:
    s = _settings()
    assert (s.batch_size, s.window_s, s.report_failures, s.max_concurrency) == (10, 0, False,
                                                                               None)
    assert _settings(batch_size=10_000, window_s=1).batch_size == 10_000
    assert _settings(response_types=["ReportBatchItemFailures"]).report_failures
    assert _settings(scaling={"MaximumConcurrency": 2}).max_concurrency == 2
    assert _settings(batch_size=10, fifo=True).fifo
    for bad in ({"batch_size": 11}, {"batch_size": 10_001, "window_s": 5},
                {"batch_size": 0}, {"batch_size": True}, {"window_s": 301},
                {"batch_size": 11, "fifo": True, "window_s": 1},
                {"window_s": 1, "fifo": True}, {"response_types": ["Other"]},
                {"response_types": "ReportBatchItemFailures"},
                {"scaling": {"MaximumConcurrency": 1}},
                {"scaling": {"MaximumConcurrency": 1001}}, {"scaling": {"Other": 5}}):
        with pytest.raises(esm.SettingsError):
            _settings(**bad)


def test_state_transitions() -> None:
    assert esm.next_state("Enabled", "disable") == "Disabling"
    assert esm.settled("Disabling", False) == "Disabled"
    assert esm.next_state("Disabled", "enable") == "Enabling"
    assert esm.settled("Enabling", True) == "Enabled"
    assert esm.settled("Creating", True) == "Enabled"
    assert esm.settled("Creating", False) == "Disabled"
    assert esm.next_state("Enabled", "update") == "Updating"
    assert esm.next_state("Enabled", "delete") == "Deleting"
    assert esm.settled("Deleting", False) is None
    assert esm.settled("Deleting", True) == "Deleting"  # not gone while its poller runs
    with pytest.raises(esm.TransitionError):
        esm.next_state("Deleting", "enable")


@pytest.mark.parametrize("payload, expected", [
    (None, set()), (b"", set()), (b"null", set()), (b"{}", set()),
    (b'{"batchItemFailures": []}', set()), (b'{"batchItemFailures": null}', set()),
    (b'{"batchItemFailures": [{"itemIdentifier": "b"}]}', {"b"}),
    (b"not json", None), (b'"ok"', None), (b'{"batchItemFailures": "b"}', None),
    (b'{"batchItemFailures": [{"itemIdentifier": ""}]}', None),
    (b'{"batchItemFailures": [{"itemIdentifier": null}]}', None),
    (b'{"batchItemFailures": [{"itemId": "b"}]}', None),
    (b'{"batchItemFailures": [{"itemIdentifier": "zz"}]}', None),
])
def test_batch_item_failures(payload: bytes | None, expected: set[str] | None) -> None:
    assert esm.failed_items(payload, ["a", "b", "c"], report=True) == expected
    assert esm.failed_items(payload, ["a", "b", "c"], report=False) == set()


def _rec(i: int, group: str | None = None, body: str = "x") -> dict[str, Any]:
    attrs = {"ApproximateReceiveCount": "1"}
    if group is not None:
        attrs["MessageGroupId"] = group
    return esm.sqs_record(message_id=f"m{i}", receipt=f"r{i}", body=body, md5_of_body="",
                          attributes=attrs, message_attributes={},
                          md5_of_message_attributes=None, queue_arn="arn:aws:sqs:r:1:q",
                          region="r")


def _params(**kw: Any) -> esm.PollerParams:
    base: dict[str, Any] = {"batch_size": 10, "window_ms": 0, "report_failures": True,
                            "fifo": False, "concurrency_max": 5, "visibility_ms": 30_000,
                            "function_timeout_ms": 3_000}
    return esm.PollerParams(**{**base, **kw})


def _recv(core: esm.PollerCore, recs: list[dict[str, Any]], now: int,
          matched: list[bool] | None = None) -> list[esm.Instruction]:
    return core.handle(esm.Received(tuple(recs), tuple(matched or [True] * len(recs))), now)


def test_a_batch_runs_and_only_its_successes_are_deleted() -> None:
    core = esm.PollerCore(_params(), random.Random(1))
    assert core.handle(esm.Tick(), 0) == [esm.Receive(10)]
    out = _recv(core, [_rec(i) for i in range(3)], 1)
    invoke = out[0]
    assert isinstance(invoke, esm.Invoke) and [r["messageId"] for r in invoke.records] == [
        "m0", "m1", "m2"]
    assert json.loads(esm.event_payload(invoke.records))["Records"][0]["eventSource"] == "aws:sqs"
    done = core.handle(esm.InvokeDone(invoke.batch_id, "ok",
                                      b'{"batchItemFailures": [{"itemIdentifier": "m1"}]}'), 2)
    assert esm.Delete(("r0", "r2"), "succeeded") in done
    # a function error: nothing deleted
    out = _recv(core, [_rec(5)], 3)
    inv = next(i for i in out if isinstance(i, esm.Invoke))
    done = core.handle(esm.InvokeDone(inv.batch_id, "function_error", b"{}"), 4)
    assert not [i for i in done if isinstance(i, esm.Delete)]
    # a malformed response: the whole batch failed
    out = _recv(core, [_rec(6)], 5)
    inv = next(i for i in out if isinstance(i, esm.Invoke))
    done = core.handle(esm.InvokeDone(inv.batch_id, "ok", b"garbage"), 6)
    assert not [i for i in done if isinstance(i, esm.Delete)]
    assert core.counters["failed"] == 3 and core.counters["succeeded"] == 2


def test_unmatched_messages_are_deleted_unseen() -> None:
    core = esm.PollerCore(_params(), random.Random(1))
    core.handle(esm.Tick(), 0)
    out = _recv(core, [_rec(0), _rec(1)], 1, matched=[False, True])
    assert out[0] == esm.Delete(("r0",), "filtered")
    inv = out[1]
    assert isinstance(inv, esm.Invoke) and [r["messageId"] for r in inv.records] == ["m1"]


def test_in_flight_batches_never_exceed_the_concurrency() -> None:
    core = esm.PollerCore(_params(concurrency_max=2), random.Random(1))
    out = core.handle(esm.Tick(), 0)
    for i in range(2):
        assert out[-1] == esm.Receive(10)
        out = _recv(core, [_rec(10 * i + j) for j in range(10)], 1)
    assert [type(x) for x in out] == [esm.Invoke]  # both slots busy: no receive
    assert core.running() == 2 and core.handle(esm.Tick(), 5_000) == []
    # nothing to wake up for until an invocation answers (the shell must not spin)
    assert core.wake_at_ms(5_000) is None
    out = core.handle(esm.InvokeDone(0, "ok", None), 6_000)
    assert out[-1] == esm.Receive(10)


def test_concurrency_scales_up_while_batches_come_full() -> None:
    core = esm.PollerCore(_params(concurrency_max=8, concurrency_initial=2,
                                  scale_up_interval_ms=100), random.Random(1))
    now = 0
    out = core.handle(esm.Tick(), now)
    for i in range(20):
        now += 100
        if not out or not isinstance(out[-1], esm.Receive):
            break
        out = _recv(core, [_rec(10 * i + j) for j in range(10)], now)
    assert core.concurrency == 8 == core.running()


def test_the_batching_window_gathers_up_to_the_batch_size() -> None:
    core = esm.PollerCore(_params(batch_size=25, window_ms=2_000), random.Random(1))
    assert core.handle(esm.Tick(), 0) == [esm.Receive(10)]
    assert _recv(core, [_rec(i) for i in range(10)], 1) == [esm.Receive(10)]
    assert _recv(core, [_rec(10 + i) for i in range(10)], 2) == [esm.Receive(5)]
    out = _recv(core, [_rec(20 + i) for i in range(5)], 3)
    assert isinstance(out[0], esm.Invoke) and len(out[0].records) == 25
    # a slow trickle: the window sends what there is
    core2 = esm.PollerCore(_params(batch_size=25, window_ms=2_000), random.Random(1))
    core2.handle(esm.Tick(), 0)
    assert _recv(core2, [_rec(0)], 10) == [esm.Receive(10)]
    assert _recv(core2, [], 20) == []
    assert core2.wake_at_ms(20) == 1_020  # the next poll, before the window ends
    assert core2.handle(esm.Tick(), 1_020) == [esm.Receive(10)]
    assert _recv(core2, [], 1_030) == []
    out = core2.handle(esm.Tick(), 2_010)
    assert isinstance(out[0], esm.Invoke) and len(out[0].records) == 1


def test_a_batch_stays_under_the_invoke_payload_limit() -> None:
    big = "x" * 1000
    core = esm.PollerCore(_params(batch_size=100, window_ms=5_000, payload_bytes_max=4_000),
                          random.Random(1))
    core.handle(esm.Tick(), 0)
    out = _recv(core, [_rec(i, body=big) for i in range(10)], 1)
    invokes = [i for i in out if isinstance(i, esm.Invoke)]
    assert invokes and all(len(esm.event_payload(i.records)) <= 4_000 for i in invokes)


def test_a_throttled_batch_is_retried_after_backoff_while_it_stays_invisible() -> None:
    core = esm.PollerCore(_params(visibility_ms=10_000, function_timeout_ms=3_000,
                                  backoff_ms_min=100, backoff_ms_max=1_000), random.Random(3))
    core.handle(esm.Tick(), 0)
    inv = _recv(core, [_rec(0)], 0)[0]
    assert isinstance(inv, esm.Invoke)
    assert core.handle(esm.InvokeDone(inv.batch_id, "throttled"), 10) == []
    due = core.wake_at_ms(10)
    assert due is not None and 110 <= due <= 1_010
    out = core.handle(esm.Tick(), due)
    assert out[0] == esm.Invoke(inv.batch_id, inv.records)
    # throttled again and again: once it could not finish before reappearing, it is let go
    now = due
    for _ in range(50):
        out = core.handle(esm.InvokeDone(inv.batch_id, "throttled"), now)
        if inv.batch_id not in core.batches:
            break
        now = core.wake_at_ms(now) or now
        out = core.handle(esm.Tick(), now)
    assert inv.batch_id not in core.batches and core.counters["abandoned"] == 1
    assert core.counters["deleted"] == 0


def test_fifo_failures_hold_back_the_rest_of_their_group() -> None:
    core = esm.PollerCore(_params(fifo=True), random.Random(1))
    core.handle(esm.Tick(), 0)
    recs = [_rec(0, "a"), _rec(1, "a"), _rec(2, "b"), _rec(3, "a"), _rec(4, "b")]
    inv = _recv(core, recs, 1)[0]
    assert isinstance(inv, esm.Invoke)
    out = core.handle(esm.InvokeDone(inv.batch_id, "ok",
                                     b'{"batchItemFailures": [{"itemIdentifier": "m1"}]}'), 2)
    assert esm.Delete(("r0", "r2", "r4"), "succeeded") in out


def test_stop_finishes_in_flight_batches_then_idles() -> None:
    core = esm.PollerCore(_params(), random.Random(1))
    core.handle(esm.Tick(), 0)
    inv = _recv(core, [_rec(0)], 1)[0]
    assert isinstance(inv, esm.Invoke)
    assert core.handle(esm.Stop(), 2) == [] and not core.idle()
    assert _recv(core, [], 2) == []  # the receive that was under way when it stopped
    assert esm.Delete(("r0",), "succeeded") in core.handle(esm.InvokeDone(inv.batch_id, "ok"), 3)
    assert core.idle() and core.wake_at_ms(3) is None


@pytest.mark.parametrize("seed", range(20))
def test_random_runs_delete_only_what_succeeded(seed: int) -> None:
    """A fake queue (visibility, receive counts, a dead-letter queue after 3 receives) under
    random outcomes: no message is deleted unless the function succeeded with it, batches in
    flight stay within the concurrency, and every message ends deleted or dead-lettered."""
    rng = random.Random(seed)
    cmax = rng.randint(1, 6)
    core = esm.PollerCore(_params(concurrency_max=cmax, batch_size=rng.choice([1, 5, 10]),
                                  visibility_ms=5_000, function_timeout_ms=1_000),
                          random.Random(seed))
    n = 200
    fails = {f"m{i}" for i in range(n) if i % 7 == 0}
    visible_at = {f"m{i}": 0 for i in range(n)}
    deleted: set[str] = set()
    dead: set[str] = set()
    receives: dict[str, int] = {}
    succeeded: set[str] = set()
    pending: list[esm.Instruction] = core.handle(esm.Tick(), 0)
    running: dict[int, esm.Invoke] = {}
    now = 0
    for _ in range(20_000):
        while pending:
            ins = pending.pop(0)
            if isinstance(ins, esm.Receive):
                ids = sorted((m for m, t in visible_at.items() if t <= now and m not in deleted
                              and m not in dead), key=lambda m: int(m[1:]))[: ins.max_messages]
                for m in list(ids):  # the queue's RedrivePolicy: maxReceiveCount 3
                    if receives.get(m, 0) >= 3:
                        dead.add(m)
                        ids.remove(m)
                for m in ids:
                    visible_at[m] = now + 5_000
                    receives[m] = receives.get(m, 0) + 1
                recs = [_rec(int(m[1:])) for m in ids]
                pending += core.handle(esm.Received(tuple(recs), (True,) * len(recs)), now)
            elif isinstance(ins, esm.Invoke):
                running[ins.batch_id] = ins
                assert core.running() <= cmax
            elif isinstance(ins, esm.Delete):
                for r in ins.receipts:
                    m = "m" + r[1:]
                    assert m in succeeded and m not in fails, m
                    deleted.add(m)
        now += rng.randint(1, 300)
        if running and rng.random() < 0.7:
            bid = rng.choice(sorted(running))
            inv = running.pop(bid)
            outcome = rng.choice(["ok", "ok", "ok", "throttled", "function_error"])
            ids = [str(r["messageId"]) for r in inv.records]
            if outcome == "ok":
                succeeded.update(m for m in ids if m not in fails)
                payload = json.dumps({"batchItemFailures": [
                    {"itemIdentifier": m} for m in ids if m in fails]}).encode()
            else:
                payload = None
            pending = core.handle(esm.InvokeDone(bid, outcome, payload), now)
        else:
            pending = core.handle(esm.Tick(), now)
        if deleted | dead == {f"m{i}" for i in range(n)}:
            break
    assert deleted | dead == {f"m{i}" for i in range(n)}
    assert fails <= dead and not deleted & dead


def test_a_due_retry_waits_for_a_slot_without_waking_the_shell() -> None:
    core = esm.PollerCore(_params(concurrency_max=2, backoff_ms_min=100, backoff_ms_max=100),
                          random.Random(1))
    core.handle(esm.Tick(), 0)
    a = _recv(core, [_rec(i) for i in range(10)], 0)[0]
    b = _recv(core, [_rec(10 + i) for i in range(10)], 0)[0]
    assert isinstance(a, esm.Invoke) and isinstance(b, esm.Invoke)
    assert core.handle(esm.InvokeDone(a.batch_id, "throttled"), 10) == []
    assert core.concurrency == 1 and core.running() == 1
    # a is due at 110 but b holds the only slot: nothing to do until b answers
    assert core.handle(esm.Tick(), 200) == [] and core.wake_at_ms(200) is None
    out = core.handle(esm.InvokeDone(b.batch_id, "ok"), 300)
    assert esm.Invoke(a.batch_id, a.records) in out


def test_errors_back_off_more_each_time_until_the_function_runs() -> None:
    core = esm.PollerCore(_params(backoff_ms_min=100, backoff_ms_max=1_000), random.Random(2))
    now = 0
    caps = []
    core.handle(esm.Tick(), now)
    for i in range(6):
        inv, again = _recv(core, [_rec(i)], now)
        assert isinstance(inv, esm.Invoke) and again == esm.Receive(10)
        core.handle(esm.InvokeDone(inv.batch_id, "error"), now)
        caps.append(core.backoff_ms)
        due = core.next_receive_ms
        assert now < due <= now + core.backoff_ms
        # the receive under way brings messages: the backoff still holds
        assert [type(x) for x in _recv(core, [_rec(100 + i)], now)] == [esm.Invoke]
        assert core.next_receive_ms == due
        core.handle(esm.InvokeDone(inv.batch_id + 1, "function_error"), now)
        core.backoff_ms = caps[-1]  # (that one ran the function; keep counting errors)
        now = due
        assert core.handle(esm.Tick(), now) == [esm.Receive(10)]
    assert caps == [100, 200, 400, 800, 1_000, 1_000]
    inv = _recv(core, [_rec(9)], now)[0]
    assert isinstance(inv, esm.Invoke)
    core.handle(esm.InvokeDone(inv.batch_id, "function_error"), now)
    assert core.backoff_ms == 0
