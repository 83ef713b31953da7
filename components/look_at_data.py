"""Pipeline step 0: a cheap look at the data set; its fingerprint keys the cache of every later step."""

from typing import NamedTuple

from kfp import dsl

from components._image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def look_at_data(data_uri: str) -> NamedTuple("Outputs", [("fingerprint", str), ("files", int)]):
    """Fingerprints the content under data_uri without decoding anything (never cached).

    Args:
        data_uri: gs:// URI (only listed: names, sizes, checksums) or mounted path (files hashed).

    Returns:
        The content fingerprint, the same whenever the content is, and the number of files listed.
    """
    import collections

    from trainer import logs
    from trainer.data.fingerprint import look_at_data as look

    logs.configure()
    found = look(data_uri)
    outputs = collections.namedtuple("Outputs", ["fingerprint", "files"])
    return outputs(found.fingerprint, found.files)
