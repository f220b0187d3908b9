"""The app room: ``captioner app``, the web page and JSON API over the registry's champion.

Holds: the hot-swap holder that follows the champion alias (``hot_swap``), the FastAPI routes
and upload limits (``routes``), who may do what: owner tokens, the operator, origins, hosts, rate
limits (``access``), the feedback desk (``feedback_desk``) and the static page (``static/index.html``).

May import: ``pipeline.search``, ``pipeline.alttext`` (captions written into downloaded photos), ``pipeline.registry``, ``pipeline.captioning``, ``pipeline.data`` and the ground floor.
"""
