"""``twistd curlfetch``. Kept this small because twistd imports every plugin to list its
subcommands; ``curlfetch.tap`` is imported only when curlfetch runs."""

from twisted.application.service import ServiceMaker

curlfetch = ServiceMaker("curlfetch", "curlfetch.tap", "The curlfetch job service.", "curlfetch")
