"""Where a trained attention decoder looked, on real photos: one PNG strip per dev photo.

Reads a decoder saved by ``bench_quality.py --save DIR`` (trained with ``train.decoder:
attention``), the real folder's pooled embeddings and grid of regions, and its ``dev_photos/``;
chooses each photo's caption as evaluate does (``decoding.*``: beam, consensus reranking), then
draws the photo with its caption and, per word, the regions the decoder weighed
(``pipeline/captioning/attention_strip.py``). No CNN runs: the features come from the folder.

    python benchmarks/attention_strips.py --load /tmp/attention --out docs/attention --photos 4
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROJECT = Path(__file__).resolve().parents[1]
REAL = PROJECT.parent / "shared" / "flickr8k_real"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", type=Path, required=True, help="folder with decoder.keras + vocab.json")
    parser.add_argument("--data", type=Path, default=REAL, help=f"real-features folder (default: {REAL})")
    parser.add_argument("--out", type=Path, required=True, help="folder the PNG strips are written to")
    parser.add_argument("--photos", type=int, default=6, help="how many dev photos (in name order; default 6)")
    args = parser.parse_args()
    import yaml
    from PIL import Image
    from tqdm import tqdm

    from pipeline.atomic import atomic_path
    from pipeline.captioning.attention_strip import render_strip
    from pipeline.captioning.caption_choice import CaptionChooser
    from pipeline.captioning.consensus import Neighbours
    from pipeline.captioning.decoder import (
        attention_maps,
        decoding_models,
        grid_of,
        load_decoder,
        require_grid,
    )
    from pipeline.captioning.vocabulary import Vocabulary
    from pipeline.config import parse_settings
    from pipeline.data.features_file import read_features, row_index, rows_of
    from pipeline.data.images import thumbnail_jpeg
    from pipeline.data.real_folder import dev_photos, embeddings_file, read_captions, read_grid_rows

    settings = parse_settings(yaml.safe_load((PROJECT / "params.yaml").read_text()))
    decoder = load_decoder(args.load / "decoder.keras")
    vocab = Vocabulary.load(args.load / "vocab.json")
    if grid_of(decoder) is None:
        raise SystemExit(f"{args.load / 'decoder.keras'} reads pooled vectors only: it has no attention to draw")
    captions, _ = read_captions(args.data, settings.validation.min_tokens, settings.validation.max_tokens)
    images, pooled, _ = read_features(embeddings_file(args.data))
    found = read_grid_rows(args.data, images, pooled)
    if found is None:
        raise SystemExit(f"{args.data} holds no grid of regions beside {embeddings_file(args.data).name}")
    grid_path, features, (rows, cols, channels) = found
    try:
        require_grid(decoder, (rows * cols, channels), str(grid_path), args.load / "decoder.keras")
    except ValueError as err:
        raise SystemExit(str(err)) from None
    photos = dev_photos(args.data, set(captions.loc[captions["split"] == "dev", "image"]))
    names = sorted(photos)[:args.photos]
    if not names:
        raise SystemExit(f"{args.data} holds no dev photos (dev_photos/)")
    feats = features[rows_of(row_index(images), names)]
    chooser = CaptionChooser(decoding_models(decoder), vocab, settings.decoding,
                             Neighbours.from_split(captions, "train", images, pooled))
    best = [ranked[0].caption for ranked in chooser.choose(feats)]
    maps = attention_maps(decoder, feats, [c.tokens for c in best], vocab.start_id, vocab.sequence_length)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, caption, weights in tqdm(list(zip(names, best, maps)), desc="strips", unit="photo"):
        words = vocab.decode(caption.tokens).split()
        photo = Image.open(io.BytesIO(thumbnail_jpeg(photos[name], 480, settings.validation.max_image_pixels)))
        strip = render_strip(photo, words, weights, (rows, cols),
                             f"{' '.join(words)}\n\n(dev photo {name}: where the decoder looked for each word; "
                             "a picture for developers, not a caption judged for how sure it is)")
        with atomic_path(args.out / f"{Path(name).stem}.png") as tmp:
            strip.save(tmp, format="PNG")
        print(f"{args.out / (Path(name).stem + '.png')}: {' '.join(words)}")


if __name__ == "__main__":
    main()
