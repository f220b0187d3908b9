"""The alt-text room: text alternatives for the images of a website.

Holds: finding the images of HTML and Markdown pages that lack a text alternative, with their
exact places (``scanning``), and proposals written by the champion, reviewed by a person and
applied so that nothing else in a page changes (``proposals``); and the same captions written into
each photo's own XMP, on disk or into an uploaded photo (``tagging``).

May import: ``pipeline.registry``, ``pipeline.captioning``, ``pipeline.data`` and the ground floor.
"""
