"""Tests for the file helpers: ``safe_join`` keeps untrusted names inside their directory."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from activecall.fileio import UnsafePathError, file_safe_name, path_under_any, safe_join


class SafeJoinTests(SynchronousTestCase):
    """``safe_join(base, *parts)`` returns a path inside ``realpath(base)`` or refuses."""

    def setUp(self) -> None:
        self.base = os.path.realpath(self.mktemp())
        os.makedirs(self.base)

    def test_plain_and_nested_names_stay_inside(self) -> None:
        """A plain name and a relative sub-path resolve below the base."""
        self.assertEqual(safe_join(self.base, "a.wav"), os.path.join(self.base, "a.wav"))
        self.assertEqual(safe_join(self.base, "day", "a.wav"), os.path.join(self.base, "day", "a.wav"))

    def test_absolute_path_inside_base_is_accepted(self) -> None:
        """An absolute path that already lies inside the base is kept."""
        inside = os.path.join(self.base, "x.wav")
        self.assertEqual(safe_join(self.base, inside), inside)

    def test_escapes_are_refused(self) -> None:
        """Dot-dot, absolute paths elsewhere, the base itself, empty parts and NUL bytes are refused."""
        for parts in [("../x.wav",), ("a/../../x.wav",), ("/etc/passwd",), (".",), ("",), ("a\0b",), ()]:
            with self.assertRaises(UnsafePathError, msg=repr(parts)):
                safe_join(self.base, *parts)

    def test_sibling_with_common_prefix_is_refused(self) -> None:
        """``/base-evil`` is not inside ``/base`` although it shares a string prefix."""
        with self.assertRaises(UnsafePathError):
            safe_join(self.base, self.base + "-evil/x.wav")

    def test_symlink_out_of_base_is_refused(self) -> None:
        """A symlink inside the base that points elsewhere is resolved and refused."""
        outside = os.path.realpath(self.mktemp())
        os.makedirs(outside)
        os.symlink(outside, os.path.join(self.base, "link"))
        with self.assertRaises(UnsafePathError):
            safe_join(self.base, "link", "x.wav")

    def test_error_is_a_value_error(self) -> None:
        """Callers that catch ValueError also catch an unsafe path."""
        self.assertTrue(issubclass(UnsafePathError, ValueError))


class PathUnderAnyTests(SynchronousTestCase):
    """``path_under_any(path, bases)`` accepts a path inside one of several directories."""

    def test_inside_second_base(self) -> None:
        """A file inside any of the bases is returned resolved; others are refused."""
        first, second = (os.path.realpath(self.mktemp()) for _ in range(2))
        for d in (first, second):
            os.makedirs(d)
        inside = os.path.join(second, "a.wav")
        self.assertEqual(path_under_any(inside, (first, second)), inside)
        for path in ("/etc/passwd", os.path.join(first, "..", "x.wav"), "", "a\0b"):
            with self.assertRaises(UnsafePathError, msg=path):
                path_under_any(path, (first, second))


class FileSafeNameTests(SynchronousTestCase):
    """``file_safe_name`` turns an id into one harmless path component."""

    def test_names(self) -> None:
        """Separators, dots, NUL and odd characters are replaced; ordinary ids are kept."""
        self.assertEqual(file_safe_name("s.4f2a-01@host"), "s.4f2a-01@host")
        self.assertEqual(file_safe_name("../../etc/passwd"), "_._.._etc_passwd")
        self.assertEqual(file_safe_name(".."), "_.")
        self.assertEqual(file_safe_name("a\0b\\c\r\n"), "a_b_c__")
        self.assertEqual(file_safe_name(""), "_")

    def test_long_ids_are_hashed_and_stay_distinct(self) -> None:
        """A 10 000-character id becomes a short name; two long ids differing at the end differ."""
        a, b = file_safe_name("x" * 10000), file_safe_name("x" * 9999 + "y")
        self.assertLessEqual(len(a), 128)
        self.assertNotEqual(a, b)
