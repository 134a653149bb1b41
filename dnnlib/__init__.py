"""Small framework utilities shared by every part of the project (EDM-style `dnnlib`)."""

from .util import EasyDict, UserError, atomic_write, construct_class_by_name, get_obj_by_name, make_cache_dir_path, open_url

__all__ = ['EasyDict', 'UserError', 'atomic_write', 'construct_class_by_name', 'get_obj_by_name', 'make_cache_dir_path', 'open_url']
