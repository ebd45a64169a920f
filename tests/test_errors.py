"""The one formatter of foreign errors into one-line messages (errors.one_line)."""

from flaxvae import errors


def test_one_line_collapses_whitespace_and_caps_the_length():
  assert errors.one_line(ValueError("a\n  b\tc")) == "a b c"
  assert errors.one_line("x" * 10, limit=4) == "xxxx ..."
  assert errors.one_line("x" * 4, limit=4) == "xxxx"
  assert len(errors.one_line("y" * 10_000)) == errors.ONE_LINE_LIMIT + len(" ...")


def test_an_error_without_a_message_is_named_by_its_type():
  assert errors.one_line(KeyboardInterrupt()) == "KeyboardInterrupt"
  assert errors.one_line("") == ""
