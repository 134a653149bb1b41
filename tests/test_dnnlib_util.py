"""dnnlib.util: open_url (local paths, file:// and http(s) through a loopback server), construct_class_by_name,
atomic_write."""

import collections
import gzip
import hashlib
import http.server
import os
import socket
import threading

import pytest

import dnnlib
from dnnlib import util

PAYLOAD = bytes(range(256)) * 64


@pytest.fixture
def server(monkeypatch):
    """A loopback HTTP server on 127.0.0.1 (no external network): /net.pkl, /gz.pkl (gzip-encoded), else 404.
    Yields (base URL, list of requested paths)."""
    for name in ('no_proxy', 'NO_PROXY'):
        monkeypatch.setenv(name, '127.0.0.1,localhost')
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            routes = {'/net.pkl': (PAYLOAD, {}), '/gz.pkl': (gzip.compress(PAYLOAD), {'Content-Encoding': 'gzip'})}
            if self.path not in routes:
                self.send_error(404)
                return
            body, headers = routes[self.path]
            self.send_response(200)
            for key, value in {**headers, 'Content-Length': str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}', hits
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _read(url, **kwargs):
    with util.open_url(url, **kwargs) as f:
        return f.read()


def test_open_url_local_path_and_file_url(tmp_path):
    path = tmp_path / 'a net.pkl'
    path.write_bytes(PAYLOAD)
    assert _read(str(path)) == PAYLOAD
    assert _read(path) == PAYLOAD
    assert util.open_url(str(path), return_filename=True) == str(path)
    assert _read(path.as_uri()) == PAYLOAD      # file:///.../a%20net.pkl
    assert _read('FILE://' + str(path)) == PAYLOAD   # Schemes are case-insensitive.
    with pytest.raises(dnnlib.UserError, match='no such file'):
        util.open_url(str(tmp_path / 'absent.pkl'))
    with pytest.raises(dnnlib.UserError, match='unsupported URL scheme'):
        util.open_url('ftp://example.com/net.pkl')


def test_http_download_is_cached(server, tmp_path):
    base, hits = server
    cache_dir = tmp_path / 'cache'
    assert _read(f'{base}/net.pkl', cache_dir=str(cache_dir)) == PAYLOAD
    assert _read(f'{base}/net.pkl', cache_dir=str(cache_dir)) == PAYLOAD
    assert hits == ['/net.pkl']
    cached = util.open_url(f'{base}/net.pkl', cache_dir=str(cache_dir), return_filename=True)
    assert os.path.dirname(cached) == str(cache_dir) and open(cached, 'rb').read() == PAYLOAD
    assert hits == ['/net.pkl']
    assert [name for name in os.listdir(cache_dir) if name.endswith('.tmp')] == []


def test_http_gzip_encoded_download(server, tmp_path):
    base, hits = server
    assert _read(f'{base}/gz.pkl', cache_dir=str(tmp_path), num_attempts=1) == PAYLOAD
    assert hits == ['/gz.pkl']


def test_http_sha256(server, tmp_path):
    base, hits = server
    good = hashlib.sha256(PAYLOAD).hexdigest()
    with pytest.raises(dnnlib.UserError, match='sha256') as info:
        util.open_url(f'{base}/net.pkl', cache_dir=str(tmp_path), sha256='0' * 64)
    assert '\n' not in str(info.value)
    assert os.listdir(tmp_path) == []   # Nothing wrong is left in the cache.
    assert _read(f'{base}/net.pkl', cache_dir=str(tmp_path), sha256=good.upper()) == PAYLOAD
    # A damaged cached copy is noticed when a sha256 is given, and fetched again.
    cached = util.open_url(f'{base}/net.pkl', cache_dir=str(tmp_path), return_filename=True)
    with open(cached, 'r+b') as f:
        f.write(b'XX')
    assert _read(f'{base}/net.pkl', cache_dir=str(tmp_path), sha256=good) == PAYLOAD
    assert hits == ['/net.pkl'] * 3


def test_http_404_is_one_line_user_error(server, tmp_path):
    base, hits = server
    with pytest.raises(dnnlib.UserError, match='HTTP 404') as info:
        util.open_url(f'{base}/missing.pkl', cache_dir=str(tmp_path))
    assert '\n' not in str(info.value)
    assert hits == ['/missing.pkl']   # Not retried.
    assert os.listdir(tmp_path) == []


def test_refused_connection_is_one_line_user_error(tmp_path, monkeypatch):
    for name in ('no_proxy', 'NO_PROXY'):
        monkeypatch.setenv(name, '127.0.0.1,localhost')
    with socket.socket() as sock:   # A port that was free a moment ago and now has no listener.
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    with pytest.raises(dnnlib.UserError) as info:
        util.open_url(f'http://127.0.0.1:{port}/net.pkl', cache_dir=str(tmp_path), num_attempts=2, timeout=5)
    message = str(info.value)
    assert '\n' not in message and 'offline' in message and 'local path' in message
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('name', ['no_such_module_xyz.Thing', 'collections.NoSuchThing', 'NoDots', '.relative.Thing',
                                  'collections..OrderedDict'])
def test_construct_class_by_name_bad_name(name):
    with pytest.raises(dnnlib.UserError):
        util.construct_class_by_name(class_name=name)


def test_construct_class_by_name():
    obj = util.construct_class_by_name([('a', 1)], class_name='collections.OrderedDict', b=2)
    assert type(obj) is collections.OrderedDict and list(obj.items()) == [('a', 1), ('b', 2)]


def test_atomic_write_success_and_permissions(tmp_path):
    path = tmp_path / 'sub' / 'out.txt'
    with util.atomic_write(path, 'w') as f:
        f.write('hello')
        assert not path.exists()   # Nothing under the final name until the block succeeds.
    assert path.read_text() == 'hello' and os.listdir(path.parent) == ['out.txt']
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(ValueError):
        with util.atomic_write(path, 'w') as f:
            f.write('partial')
            raise ValueError('simulated crash')
    assert path.read_text() == 'hello' and os.listdir(path.parent) == ['out.txt']


def test_easydict():
    d = dnnlib.EasyDict(a=1)
    d.b = 2
    assert d == {'a': 1, 'b': 2} and d.a == 1
    del d.a
    with pytest.raises(AttributeError):
        d.a
