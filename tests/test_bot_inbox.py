"""The bot's durable inbox (bot.inbox) on a real database: stored sealed before confirmation, handled
in order, one failing update never stops the others, a user over the rate limit waits instead of
being dropped."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import select
from telegram import Bot, Update

from bot.inbox import MAX_ATTEMPTS, Consumer, Inbox, handle_pending
from clinic_db.models import InboxUpdate


def text_update(update_id: int, user_id: int, text: str) -> dict[str, Any]:
    user = {"id": user_id, "is_bot": False, "first_name": "Pat"}
    return {"update_id": update_id, "message": {"message_id": update_id, "date": 1_700_000_000, "from": user,
                                                "chat": {"id": user_id, "type": "private"}, "text": text}}


def bot() -> Bot:
    return Bot("123456:TEST", base_url="http://127.0.0.1:9/bot")  # never called: de_json only


def test_updates_are_stored_sealed_once_and_confirmed_after_the_commit(clinic) -> None:  # type: ignore[no-untyped-def]
    inbox = Inbox(clinic)
    assert inbox.next_offset() == 0
    assert inbox.store([text_update(7, 1001, "my mole is bleeding"), text_update(5, 1002, "hello")]) == 2
    assert inbox.store([text_update(7, 1001, "my mole is bleeding")]) == 0  # Telegram delivered it again
    assert inbox.next_offset() == 8
    with clinic.session() as session:
        rows = session.scalars(select(InboxUpdate)).all()
    assert len(rows) == 2
    for row in rows:  # what the patient wrote and who they are is not readable in the table
        assert b"bleeding" not in row.payload_enc and b"1001" not in row.payload_enc
    assert [p.update_id for p in inbox.pending()] == [5, 7]  # oldest first
    assert inbox.pending()[1].payload["message"]["text"] == "my mole is bleeding"
    inbox.done(5)
    with clinic.session() as session:
        done = session.get(InboxUpdate, 5)
        assert done.status == "done" and done.payload_enc is None  # nothing kept once handled
    assert [p.update_id for p in inbox.pending()] == [7]


def test_one_failing_update_does_not_stop_the_others_and_is_parked_after_retries(clinic) -> None:  # type: ignore[no-untyped-def]
    inbox = Inbox(clinic)
    inbox.store([text_update(1, 11, "boom"), text_update(2, 12, "fine"), text_update(3, 11, "after boom")])
    handled: list[str] = []

    async def handle(update: Update, attempt: int) -> None:
        if update.effective_message.text == "boom":
            raise RuntimeError("handler bug")
        handled.append(update.effective_message.text)

    async def admit(update: Update) -> bool:
        return True

    assert asyncio.run(handle_pending(bot(), inbox, handle, admit)) == 1
    # user 12 was handled; user 11's later message waits behind the failed one, keeping that user's order
    assert handled == ["fine"]
    for _ in range(MAX_ATTEMPTS - 1):
        asyncio.run(handle_pending(bot(), inbox, handle, admit))
    assert handled == ["fine", "after boom"]  # parked after MAX_ATTEMPTS tries; the next one went on
    with clinic.session() as session:
        failed = session.get(InboxUpdate, 1)
        assert failed.status == "failed" and failed.attempts == MAX_ATTEMPTS and failed.payload_enc is None
        assert "RuntimeError" in failed.last_error
    assert inbox.pending() == []


def test_a_user_over_the_limit_waits_in_the_inbox_in_order(clinic) -> None:  # type: ignore[no-untyped-def]
    inbox = Inbox(clinic)
    inbox.store([text_update(i, 21, f"message {i}") for i in range(1, 6)] + [text_update(10, 22, "other")])
    handled: list[str] = []
    budget = {21: 2}

    async def handle(update: Update, attempt: int) -> None:
        handled.append(update.effective_message.text)

    async def admit(update: Update) -> bool:
        user = update.effective_user.id
        if user not in budget:
            return True
        budget[user] -= 1
        return budget[user] >= 0

    asyncio.run(handle_pending(bot(), inbox, handle, admit))
    assert sorted(handled) == ["message 1", "message 2", "other"]  # the other user is not held up
    assert handled.index("message 1") < handled.index("message 2")
    assert [p.update_id for p in inbox.pending()] == [3, 4, 5]  # kept, not dropped
    budget[21] = 10  # the window moved on
    asyncio.run(handle_pending(bot(), inbox, handle, admit))
    assert handled[3:] == ["message 3", "message 4", "message 5"]
    assert inbox.pending() == []


def test_users_are_handled_side_by_side_each_in_order_and_a_dermatologist_alone(clinic) -> None:  # type: ignore[no-untyped-def]
    """A slow update (a photo download, a reply Telegram is slow to take) holds up only its own user.
    Each user's updates still run one after the other, oldest first; a dermatologist's update runs with
    no other handler beside it."""
    inbox = Inbox(clinic)
    inbox.store([text_update(1, 31, "slow"), text_update(2, 31, "after slow"), text_update(3, 32, "quick"),
                 text_update(4, 33, "derm"), text_update(5, 34, "late")])
    order: list[str] = []
    running: dict[int, int] = {}
    beside_derm: list[int] = []
    quick_done = asyncio.Event()

    async def handle(update: Update, attempt: int) -> None:
        user, text = update.effective_user.id, update.effective_message.text
        assert running.get(user, 0) == 0, "two updates of one user at once"
        running[user] = 1
        try:
            if text == "slow":  # finishes only once another user's update was handled meanwhile
                await asyncio.wait_for(quick_done.wait(), timeout=10)
            if text == "derm":
                beside_derm.append(sum(running.values()))
                await asyncio.sleep(0.05)
                beside_derm.append(sum(running.values()))
            await asyncio.sleep(0)
            order.append(text)
            if text == "quick":
                quick_done.set()
        finally:
            running[user] = 0

    async def admit(update: Update) -> bool:
        return True

    async def exclusive(update: Update) -> bool:
        return update.effective_user.id == 33

    finished = asyncio.run(handle_pending(bot(), inbox, handle, admit, exclusive=exclusive, concurrency=4))
    assert finished == 5 and inbox.pending() == []
    assert order.index("quick") < order.index("slow") < order.index("after slow")
    assert beside_derm == [1, 1]  # alone from start to end


def test_one_at_a_time_when_concurrency_is_one(clinic) -> None:  # type: ignore[no-untyped-def]
    inbox = Inbox(clinic)
    inbox.store([text_update(i, 40 + i, f"m{i}") for i in range(1, 5)])
    at_once: list[int] = []
    running = 0

    async def handle(update: Update, attempt: int) -> None:
        nonlocal running
        running += 1
        at_once.append(running)
        await asyncio.sleep(0.01)
        running -= 1

    async def admit(update: Update) -> bool:
        return True

    assert asyncio.run(handle_pending(bot(), inbox, handle, admit, concurrency=1)) == 4
    assert max(at_once) == 1


def test_an_update_stored_while_others_are_in_hand_is_handled_at_once_and_only_once(clinic) -> None:  # type: ignore[no-untyped-def]
    """The consumer reads the inbox again whenever intake stores something: a new user's message does
    not wait for a slow handler of someone else, and an update in hand (or finished while a read ran)
    is never started twice."""
    inbox = Inbox(clinic)
    inbox.store([text_update(1, 51, "slow"), text_update(2, 52, "first")])
    handled: list[str] = []
    late_done = asyncio.Event()

    async def handle(update: Update, attempt: int) -> None:
        text = update.effective_message.text
        if text == "slow":  # finishes only once the update stored after it was handled
            await asyncio.wait_for(late_done.wait(), timeout=10)
        handled.append(text)
        if text == "late":
            late_done.set()

    async def admit(update: Update) -> bool:
        return True

    async def scenario() -> None:
        consumer = Consumer(bot(), inbox, handle, admit, concurrency=4)
        assert await consumer.fill() == 2
        while "first" not in handled:
            await asyncio.sleep(0.01)
        inbox.store([text_update(3, 53, "late"), text_update(4, 51, "after slow")])
        assert await consumer.fill() == 2  # "slow" is in hand, "first" done: only the new ones start
        assert await consumer.fill() == 0  # read again at once: nothing starts twice
        await asyncio.wait_for(consumer.lanes.drain(), timeout=10)
        assert consumer.finished == 4

    asyncio.run(scenario())
    assert handled == ["first", "late", "slow", "after slow"]
    assert inbox.pending() == []


def test_a_held_user_is_read_again_after_the_hold(clinic) -> None:  # type: ignore[no-untyped-def]
    """A user over the rate limit keeps their order: nothing of theirs starts before the hold is over."""
    inbox = Inbox(clinic)
    inbox.store([text_update(1, 61, "one"), text_update(2, 61, "two")])
    handled: list[str] = []
    allow = False

    async def handle(update: Update, attempt: int) -> None:
        handled.append(update.effective_message.text)

    async def admit(update: Update) -> bool:
        return allow

    async def scenario() -> None:
        nonlocal allow
        consumer = Consumer(bot(), inbox, handle, admit, hold_s=0.2)
        await consumer.fill()
        await consumer.lanes.drain()
        allow = True
        assert await consumer.fill() == 0  # still held
        await asyncio.sleep(0.25)
        assert await consumer.fill() == 2
        await consumer.lanes.drain()

    asyncio.run(scenario())
    assert handled == ["one", "two"]
