"""The search room: find photos by what is in them.

Holds: the photo index database (``photo_index``: SQLite with FTS5 by default, PostgreSQL when
configured), indexing a folder with the champion (``indexing``: incremental, resumable, reusing
embeddings when only the decoder changed; storing what a person wrote into a photo's own
metadata) and ranking photos for a text query (``ranking``: the
caption model's own likelihood of the query, full-text BM25 over the stored captions, a blend).

May import: ``pipeline.registry``, ``pipeline.captioning``, ``pipeline.data`` and the ground floor.
"""
