"""TraceSetting: the context variable behind the trace-time settings (attention kernel, dropout
masks, ambient dropout key, BatchNorm axis, LM loss chunk)."""

import threading

import pytest

from sft_jax.models import trace_setting


def test_scope_sets_and_restores_even_when_the_block_raises():
    s = trace_setting.TraceSetting("x", 0)
    with s.scope(1):
        with s.scope(2):
            assert s.get() == 2
        assert s.get() == 1
        with pytest.raises(RuntimeError), s.scope(3):
            raise RuntimeError
        assert s.get() == 1
    assert s.get() == 0
    s.set(5)
    assert s.get() == 5


def test_a_rejected_value_changes_nothing_and_names_the_choices():
    s = trace_setting.choice("attention", ("xla", "cudnn"), "xla")
    with pytest.raises(ValueError, match=r"attention implementation 'flash'.*'xla', 'cudnn'"):
        s.set("flash")
    with pytest.raises(ValueError, match="'flash'"), s.scope("flash"):
        pass
    assert s.get() == "xla"


def test_another_thread_sees_the_default():
    s = trace_setting.TraceSetting("x", "default")
    s.set("main")
    seen = []
    t = threading.Thread(target=lambda: seen.append(s.get()))
    t.start()
    t.join()
    assert seen == ["default"] and s.get() == "main"
