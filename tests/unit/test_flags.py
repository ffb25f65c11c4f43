# -*- test-case-name: tests.unit.test_flags -*-
"""
Tests for L{spegel.flags}: the converters and L{CommandOptions}, which the node's options and
the C{spegel} command's subcommands share.
"""

from __future__ import annotations

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from spegel import flags
from spegel.addresses import ListenAddress
from spegel.tap import Options as NodeOptions


class Sample(flags.CommandOptions):
    optParameters = [
        flags.parameter("addr", ":8080", "where", flags.parse_listen_address),
        flags.parameter("items", "", "what", flags.list_of(str)),
        flags.parameter("on", "false", "whether", flags.parse_bool),
        flags.parameter("wait", "1s", "how long", flags.parse_duration),
        flags.parameter("needed", None, "no default"),
        flags.parameter("count", "3", "how many", flags.whole_number(1, 9)),
    ]
    booleans = frozenset({"on"})
    lists = frozenset({"items"})


def parse(*argv: str) -> Sample:
    options = Sample()
    options.parseOptions(list(argv))
    return options


class CommandOptionsTests(SynchronousTestCase):
    def test_defaults_are_converted(self) -> None:
        options = parse()
        self.assertEqual(options["addr"], ListenAddress("", 8080))
        self.assertEqual(options["items"], ())
        self.assertIs(options["on"], False)
        self.assertEqual(options["wait"], 1.0)
        self.assertIsNone(options["needed"])
        self.assertEqual(options["count"], 3)

    def test_error_names_the_flag(self) -> None:
        e = self.assertRaises(usage.UsageError, parse, "--count=10")
        self.assertEqual(str(e), "--count: must be a whole number from 1 to 9, not '10'")
        e = self.assertRaises(usage.UsageError, parse, "--addr", ":0")
        self.assertTrue(str(e).startswith("--addr: ':0' is not an address"), str(e))

    def test_list_forms(self) -> None:
        self.assertEqual(parse("--items=a,b", "--items", "c", "d, e", "--on")["items"], ("a", "b", "c", "d", "e"))
        self.assertEqual(parse("--items=")["items"], ())
        self.assertEqual(parse("--items")["items"], ())

    def test_bool_forms(self) -> None:
        for argv, expected in (
            (["--on"], True),
            (["--on", "no"], False),
            (["--on=off"], False),
            (["--on", "--items=x"], True),
            (["--on=false", "--on"], True),
        ):
            self.assertIs(parse(*argv)["on"], expected, argv)

    def test_word_after_bool_that_is_not_one_is_an_argument(self) -> None:
        e = self.assertRaises(usage.UsageError, parse, "--on", "maybe")
        self.assertIn("maybe", str(e))

    def test_value_that_looks_like_a_flag(self) -> None:
        self.assertEqual(parse("--needed", "--on")["needed"], "--on")
        self.assertIs(parse("--needed", "--on")["on"], False)

    def test_help_and_version_are_text(self) -> None:
        shown = self.assertRaises(flags.ShowText, parse, "--help")
        self.assertIn("--addr", shown.text)
        self.assertRaises(flags.ShowText, parse, "--version")


class NodeListTests(SynchronousTestCase):
    """
    The node's list flags take the forms C{spegel configuration} takes.
    """

    def test_repeated_and_several_words(self) -> None:
        options = NodeOptions()
        options.parseOptions(
            [
                "--mirrored-registries", "https://docker.io", "https://ghcr.io",
                "--mirrored-registries=http://127.0.0.1:5000",
                "--static-bootstrap-peers", "10.0.0.1:5001",
                "--static-bootstrap-peers", "[fd00::2]:5001",
            ]
        )
        self.assertEqual(
            options.node.registry_filter.mirrored_registries,
            frozenset({"docker.io", "ghcr.io", "127.0.0.1:5000"}),
        )
        self.assertEqual(options.node.static_bootstrap_peers, (("10.0.0.1", 5001), ("fd00::2", 5001)))


class SizeTests(SynchronousTestCase):
    def test_units(self) -> None:
        self.assertEqual(flags.parse_size("0"), 0)
        self.assertEqual(flags.parse_size("1048576"), 1 << 20)
        self.assertEqual(flags.parse_size("512Ki"), 512 << 10)
        self.assertEqual(flags.parse_size("32Mi"), 32 << 20)
        self.assertEqual(flags.parse_size("2Gi"), 2 << 30)

    def test_bad(self) -> None:
        for text in ("", "32MB", "-1", "1.5Gi", "Mi"):
            self.assertRaises(ValueError, flags.parse_size, text)


class DurationTests(SynchronousTestCase):
    def test_compound(self) -> None:
        self.assertAlmostEqual(flags.parse_duration("1h2m3.5s"), 3723.5)
        self.assertAlmostEqual(flags.parse_duration("250µs"), 0.00025)
