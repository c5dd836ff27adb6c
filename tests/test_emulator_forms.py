"""The emulator's form checks, as Konfuzio's Django REST framework makes them: no server needed."""

from konfuzio_watch.emulator.forms import is_valid_url


def test_callback_url_validation_follows_django():
    assert is_valid_url("http://127.0.0.1:8080/cb/abc")
    assert is_valid_url("http://localhost:5000/cb")
    assert is_valid_url("https://abcd-1-2-3-4.ngrok-free.app/callback/t0k3n?x=1")
    assert is_valid_url("http://[::1]:8080/cb")
    for bad in (
        "not a url",
        "ftp://example.com/x",
        "http://receiver:8080/cb",
        "http:///cb",
        "http://a b.com/",
    ):
        assert not is_valid_url(bad), bad
