"""The operator console: server-rendered pages in Chinese and English at ``/console/``.

Pages are Jinja2 templates (``templates/``) with small ES modules (``static/js``) that
read and act through the HTTP API with the browser's console session (a cookie and a
CSRF token, see :mod:`chargegw.console.pages`) and follow the event stream for live
updates. Nothing is fetched from outside the gateway: a site without internet works.
"""

from chargegw.console.pages import install

__all__ = ["install"]
