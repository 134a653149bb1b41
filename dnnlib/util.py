"""Attribute dicts, construction by dotted name, atomic file writes and cached URL fetching."""

import contextlib
import hashlib
import importlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import urllib.parse
import warnings


class UserError(Exception):
    """A mistake in the user's input (a flag, a file, a URL). Entry points print it as one line, no traceback."""

    def __str__(self):
        text = super().__str__()
        # torch's DataLoader re-raises an exception of a worker process with the worker's whole traceback as its
        # message: keep the original message, its last line.
        if 'Original Traceback (most recent call last):' not in text:
            return text
        _, found, message = text.rstrip().rpartition(f'{__name__}.UserError: ')
        return message if found else text


class EasyDict(dict):
    """A dict whose keys can also be read and written as attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value

    def __delattr__(self, name):
        del self[name]


def get_obj_by_name(name):
    """Resolve a dotted name such as 'training.methods.loss.ECTLoss' to the object it names."""
    module_name, _, attr = name.rpartition('.')
    if not module_name:
        raise UserError(f'"{name}" is not a dotted name of the form module.object')
    try:
        module = importlib.import_module(module_name)
    except (ImportError, TypeError, ValueError) as e:  # TypeError/ValueError: relative or malformed names ('.x.Y').
        raise UserError(f'cannot import module "{module_name}" for "{name}": {e}') from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise UserError(f'module "{module_name}" has no attribute "{attr}" (from "{name}")') from None


def construct_class_by_name(*args, class_name, **kwargs):
    """Instantiate the class named by `class_name` with the given arguments (EDM's component convention)."""
    cls = get_obj_by_name(class_name)
    if not callable(cls):
        raise UserError(f'"{class_name}" is not callable')
    return cls(*args, **kwargs)


def json_object(text, where):
    """The JSON object (a dict) in `text`; one UserError naming `where` (a flag, a file and line) otherwise."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f'{where}: not valid JSON ({e.msg}): {text.strip()}') from None
    if not isinstance(value, dict):
        raise UserError(f'{where}: expected a JSON object, got {text.strip()}')
    return value


def _current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Temporary files of atomic writes: .{name}.ect-partial-{pid}-{random}.tmp next to the file they will become.
_PARTIAL_MARK = '.ect-partial-'
_PARTIAL_PATTERN = re.compile(r'^\..+\.ect-partial-(\d+)-[A-Za-z0-9_]+\.tmp$')


def partial_prefix(path):
    """Name prefix of the temporary file (or folder) an atomic write of `path` goes through."""
    return '.' + os.path.basename(os.path.abspath(path)) + _PARTIAL_MARK + f'{os.getpid()}-'


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # Another user's live process.
    return True


def remove_stale_partials(directory):
    """Delete the temporary files and folders left in `directory` by atomic writes of processes that no longer
    run (killed mid-write); returns their names. Those of running processes are left alone."""
    removed = []
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        match = _PARTIAL_PATTERN.match(name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        removed.append(name)
    return removed


@contextlib.contextmanager
def atomic_write(path, mode='wb'):
    """Write `path` through a temporary file in the same directory, renamed into place only on success.

    A crash (or exception) inside the block leaves any previous file under `path` untouched and never a
    truncated one; the temporary file is removed (after a kill -9, remove_stale_partials finds it).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=partial_prefix(path), suffix='.tmp')
    try:
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp creates 0600; give the usual permissions.
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def os_error_message(error, flag=None):
    """One line for an OSError (read-only location, disk full, a file where a folder should be, ...): the
    flag and the path it concerns, and the system's reason."""
    reason = error.strerror or type(error).__name__
    where = ' '.join(str(x) for x in (flag, error.filename) if x)
    return f'{where}: {reason}' if where else f'{reason}: {error}'


def _nearest_existing(path):
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def check_output_dir(path, flag):
    """Refuse, before any work, a folder `path` that cannot be created or written to: a UserError naming
    `flag`. Nothing is created."""
    path = os.fspath(path)
    existing = _nearest_existing(path)
    if os.path.abspath(path) == existing and not os.path.isdir(existing):
        raise UserError(f'{flag}={path}: exists and is not a folder')
    if not os.path.isdir(existing):
        raise UserError(f'{flag}={path}: {existing} is not a folder')
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f'{flag}={path}: {existing} is not writable')


def check_output_file(path, flag):
    """Refuse, before any work, a file `path` that cannot be written (a folder in its place, or a folder
    that cannot be created or written to): a UserError naming `flag`. Nothing is created."""
    if os.path.isdir(path):
        raise UserError(f'{flag}={path}: is a folder')
    check_output_dir(os.path.dirname(os.path.abspath(path)), flag)


def make_cache_dir_path(*paths):
    """The cache directory: $ECT_CACHE_DIR, else $XDG_CACHE_HOME/ect, else ~/.cache/ect."""
    if 'ECT_CACHE_DIR' in os.environ:
        root = os.environ['ECT_CACHE_DIR']
    elif 'XDG_CACHE_HOME' in os.environ:
        root = os.path.join(os.environ['XDG_CACHE_HOME'], 'ect')
    else:
        root = os.path.join(os.path.expanduser('~'), '.cache', 'ect')
    return os.path.join(root, *paths)


def _is_url(path_or_url):
    return re.match(r'^[a-z][a-z0-9+.-]*://', str(path_or_url), re.IGNORECASE) is not None


def _url_cache_name(url):
    digest = hashlib.md5(url.encode('utf-8')).hexdigest()
    basename = re.sub(r'[^0-9a-zA-Z._-]+', '_', os.path.basename(urllib.parse.urlparse(url).path)) or 'download'
    return f'{digest}_{basename}'


def _file_sha256(data_path):
    h = hashlib.sha256()
    with open(data_path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def _check_sha256(data_path, sha256, url, source='expected'):
    digest = _file_sha256(data_path)
    if digest != sha256.lower():
        raise UserError(f'{url}: downloaded file has sha256 {digest}, but {sha256.lower()} is {source}; refusing it '
                        f'(the file changed on the server or was altered in transit)')


def _download(url, dest, sha256, num_attempts, timeout, source='expected'):
    import requests  # Deferred: only needed when something is actually fetched.
    last_error = None
    for _attempt in range(num_attempts):
        try:
            with requests.get(url, stream=True, timeout=timeout) as res:
                res.raise_for_status()
                if url.lower().startswith('https://') and not res.url.lower().startswith('https://'):
                    raise UserError(f'{url}: refusing a redirect from https to {res.url}')
                # requests decodes gzip/deflate bodies, so Content-Length counts the bytes written only when
                # the body is sent unencoded.
                encoded = res.headers.get('Content-Encoding', 'identity').lower() != 'identity'
                expected = None if encoded else res.headers.get('Content-Length')
                written = 0
                with atomic_write(dest) as f:
                    for chunk in res.iter_content(chunk_size=1 << 20):
                        f.write(chunk)
                        written += len(chunk)
                    if expected is not None and int(expected) != written:
                        raise IOError(f'connection closed after {written} of {expected} bytes')
            if sha256 is not None:
                try:
                    _check_sha256(dest, sha256, url, source)
                except UserError:
                    os.remove(dest)
                    raise
            return
        except requests.exceptions.HTTPError as e:
            raise UserError(f'cannot download {url}: HTTP {e.response.status_code} (is the URL right?)') from None
        except (requests.exceptions.RequestException, IOError) as e:
            last_error = e
    raise UserError(f'cannot download {url}: {type(last_error).__name__}: {last_error} '
                    f'(offline? download it elsewhere and pass the local path instead)') from None


def _recorded_sha256(record_path):
    """The sha256 recorded at a URL's first download (trust on first use), or None."""
    try:
        with open(record_path, encoding='ascii') as f:
            digest = f.read().strip().lower()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return digest if re.fullmatch(r'[0-9a-f]{64}', digest) else None


def _record_sha256(url, dest, record_path):
    digest = _file_sha256(dest)
    with atomic_write(record_path, 'w') as f:
        f.write(digest + '\n')
    print(f'{url}: sha256 {digest} (no published hash known; recorded in {record_path}, every later use is checked '
          f'against it)', file=sys.stderr)


def _fetch_cached(url, cache_dir, sha256, num_attempts, timeout):
    """The cached copy of `url`, verified on every use: against `sha256` when given (a pinned hash), else against
    the hash recorded at its first download. A damaged cached copy is fetched again; a download that does not
    match is one UserError naming the URL."""
    cache_dir = cache_dir if cache_dir is not None else make_cache_dir_path('downloads')
    dest = os.path.join(cache_dir, _url_cache_name(url))
    record_path = dest + '.sha256'
    recorded = _recorded_sha256(record_path)
    expected = sha256.lower() if sha256 is not None else recorded
    source = 'the pinned hash' if sha256 is not None else f'the hash recorded at its first download ({record_path})'
    if os.path.isfile(dest) and expected is not None and _file_sha256(dest) != expected:
        os.remove(dest)  # A stale or damaged cached copy: fetch it again (and check that copy).
    if not os.path.isfile(dest):
        _download(url, dest, expected, num_attempts, timeout, source)
    if expected is None:
        _record_sha256(url, dest, record_path)
    return dest


def open_url(url, cache_dir=None, cache=True, sha256=None, num_attempts=3, timeout=30, return_filename=False):
    """Open a local path, a file:// URL or an http(s) URL as a binary file object.

    http(s) URLs are downloaded once into `cache_dir` (default: make_cache_dir_path('downloads')) through a
    temporary file and an atomic rename and served from there after; the file is checked on every use against
    `sha256` when given, else against the sha256 recorded (and printed) at its first download. Plain http://
    gives a warning. With return_filename=True the local file name is returned instead of an open file.
    """
    url = os.fspath(url) if not isinstance(url, str) else url
    if not _is_url(url):
        if not os.path.isfile(url):
            raise UserError(f'no such file: {url}')
        return url if return_filename else open(url, 'rb')
    parsed = urllib.parse.urlparse(url)
    scheme = parsed.scheme.lower()
    if scheme == 'file':
        local = urllib.parse.unquote(parsed.path)
        return open_url(local, return_filename=return_filename)
    if scheme not in ('http', 'https'):
        raise UserError(f'unsupported URL scheme "{parsed.scheme}" in {url}')
    if scheme == 'http':
        warnings.warn(f'{url}: plain http:// can be altered in transit; its sha256 is checked, prefer https://',
                      stacklevel=2)
    if not cache:
        if return_filename:
            raise UserError('open_url: return_filename=True needs cache=True')
        with tempfile.TemporaryDirectory() as tmp:
            dest = os.path.join(tmp, 'download')
            _download(url, dest, sha256, num_attempts, timeout)
            with open(dest, 'rb') as f:
                return io.BytesIO(f.read())
    dest = _fetch_cached(url, cache_dir, sha256, num_attempts, timeout)
    return dest if return_filename else open(dest, 'rb')
