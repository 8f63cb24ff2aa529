"""The net layer's waiter (net/checkout.py): the atomic hand-off between a
server being checked in and a client whose wait is timing out."""

import gevent

from geobouncer.net.handoff import Waiter


def test_a_server_handed_over_is_returned():
    w = Waiter()
    g = gevent.spawn(w.wait, 5.0)
    gevent.sleep(0)
    assert w.take("server")
    assert g.get(timeout=2) is True and w.server == "server"
    assert not w.take("another")          # single use


def test_a_timed_out_waiter_refuses_the_server():
    w = Waiter()
    assert w.wait(0.01) is False
    assert w.done and not w.take("server") and w.server is None


def test_a_hand_off_racing_the_timer_is_never_lost():
    # take() runs after the timer is due but before the waiter ran: either
    # order of the two wake-ups must end with the waiter holding the server.
    for _ in range(50):
        w = Waiter()
        g = gevent.spawn(w.wait, 0.0)
        gevent.sleep(0)                     # the waiter blocks, its 0 s timer is due
        took = w.take("server")
        result = g.get(timeout=2)
        assert result is took
        assert (w.server == "server") is took


def test_an_interrupted_waiter_keeps_what_it_was_given_for_the_caller_to_return():
    w = Waiter()
    g = gevent.spawn(w.wait, None)
    gevent.sleep(0)
    assert w.take("server")
    g.kill()                                # before it woke up
    assert w.done and w.server == "server"  # _wait gives it back to the pool
    assert not w.take("another")
