"""The Gradio demo: prompt in, images out, with the sampler's progress and clear messages for bad input (a prompt
or negative prompt over the model's token limit is refused, as scripts/inference.py refuses it). A ControlNet model
adds a control image, its condition (Canny, HED with an annotator network, or an edge map) and the conditioning
scale; the edge map used is shown beside the images. Distilled (LCM) models sample with the LCM sampler: 1-8 steps,
the guidance slider off."""
import random
import threading
import warnings
from pathlib import Path

import gradio as gr
import torch

from diffusion.data.aspect_ratios import aspect_ratio_table
from diffusion.data.conditions import ConditionResizedWarning, control_latent, make_condition
from diffusion.model.nets import ControlPixArtHalf
from diffusion.pipeline import DEFAULT_STEPS, PromptError, check_prompt_length
from diffusion.sampling import get_sampler

# LCM: distilled models (4 steps, no guidance: the guidance slider is off while it is chosen)
SAMPLER_CHOICES = {"DPM-Solver": "dpm-solver", "SA-Solver": "sa-solver", "IDDPM": "iddpm", "LCM": "lcm"}
STEP_LIMITS = {"dpm-solver": (5, 50), "sa-solver": (10, 50), "iddpm": (10, 250), "lcm": (1, 8)}
CONDITION_CHOICES = {"Canny": "canny", "HED": "hed", "Edge map": "image"}  # "HED" only with an annotator network
MAX_CONDITIONING_SCALE = 2.0
MAX_IMAGES = 4
MAX_SEED = 2**31 - 1
NO_ADAPTER = "(none)"
LORA_SCALE_RANGE = (0.0, 2.0)
STYLES = {  # (template, negative prompt): "{prompt}" is replaced by the user's prompt
    "(no style)": ("{prompt}", ""),
    "Photographic": ("photograph of {prompt}, 35mm, highly detailed, sharp focus", "drawing, painting, blurry"),
    "Cinematic": ("cinematic still of {prompt}, shallow depth of field, film grain, moody", "cartoon, anime"),
    "Anime": ("anime artwork of {prompt}, vibrant, studio anime style", "photo, realistic"),
    "Digital art": ("digital art of {prompt}, concept art, detailed illustration", "photo, blurry"),
    "Pixel art": ("pixel-art {prompt}, low-res, blocky, 8-bit game", "smooth, photo, realistic"),
}


def size_choices(image_size, multi_scale):
    """'H x W' labels: the model's buckets (the demo table) for MS models, its one size otherwise."""
    if not multi_scale:
        return [f"{image_size} x {image_size}"]
    table = aspect_ratio_table(f"ASPECT_RATIO_{image_size}_TEST")
    return [f"{int(h)} x {int(w)}" for h, w in sorted(table.values(), key=lambda hw: hw[0] / hw[1])]


def adapter_choices(adapters):
    """Picker label -> adapter name for a pipeline's adapters (name -> path): the path's last part, made unique."""
    labels = {NO_ADAPTER: None}
    for name, path in adapters.items():
        label = Path(path).name
        while label in labels:
            label = f"{label} ({name})"
        labels[label] = name
    return labels


def apply_style(style, prompt, negative):
    template, style_negative = STYLES[style]
    return template.replace("{prompt}", prompt), ", ".join(p for p in (negative, style_negative) if p)


# small images are enlarged without smoothing, so their shapes are judged as they are
PIXELATED_CSS = "#gallery img { image-rendering: pixelated; image-rendering: crisp-edges; }"


def build_demo(sampler, text_encoder, title="PixArt-α", examples=(), note=None, default_sampler="DPM-Solver",
               default_guidance=4.5, hed=None):
    """A gr.Blocks app sampling with `sampler` (a diffusion.pipeline.Pipeline) and `text_encoder` (T5Embedder).
    examples: prompts offered as clickable examples; note: markdown shown under the title (e.g. the only vocabulary a
    toy model knows); default_sampler: a SAMPLER_CHOICES label; hed: a loaded HED network (diffusion.model.hed), which
    adds the HED condition for a ControlNet model. The pipeline's unmerged LoRA adapters (`sampler.adapters`)
    get a picker (the first is preselected) and a scale slider."""
    if default_sampler not in SAMPLER_CHOICES:
        raise ValueError(f"default_sampler must be one of {list(SAMPLER_CHOICES)}, got {default_sampler!r}")
    sizes = size_choices(sampler.image_size, sampler.multi_scale)
    default_size = f"{sampler.image_size} x {sampler.image_size}"
    adapters = adapter_choices(sampler.adapters)
    switching = threading.Lock()  # the active adapter is model state: one request sets it and samples at a time
    controlnet = isinstance(getattr(sampler, "model", None), ControlPixArtHalf)
    conditions = [label for label in CONDITION_CHOICES if label != "HED" or hed is not None]

    def generate(prompt, negative, style, sampler_label, steps, guidance, seed, randomize, size, count,
                 adapter_label=NO_ADAPTER, lora_scale=1.0, control_image=None, condition="Canny", conditioning_scale=1.0, progress=gr.Progress()):
        try:
            prompt = (prompt or "").strip()
            if not prompt:
                raise PromptError("Please enter a prompt.")
            algo = SAMPLER_CHOICES.get(sampler_label)
            if algo is None:
                raise PromptError(f"Unknown sampler {sampler_label!r}.")
            low, high = STEP_LIMITS[algo]
            if not low <= int(steps) <= high:
                raise PromptError(f"Steps must be between {low} and {high} for {sampler_label}.")
            if not 1.0 <= float(guidance) <= 15.0:
                raise PromptError("Guidance scale must be between 1 and 15.")
            if not 1 <= int(count) <= MAX_IMAGES:
                raise PromptError(f"Number of images must be between 1 and {MAX_IMAGES}.")
            if size not in sizes:
                raise PromptError(f"Size {size!r} is not one of this model's sizes.")
            if adapter_label not in adapters:
                raise PromptError(f"Unknown LoRA adapter {adapter_label!r}.")
            if not LORA_SCALE_RANGE[0] <= float(lora_scale) <= LORA_SCALE_RANGE[1]:
                raise PromptError(f"LoRA scale must be between {LORA_SCALE_RANGE[0]:g} and {LORA_SCALE_RANGE[1]:g}.")
            seed = random.randint(0, MAX_SEED) if randomize else int(seed)
            if not 0 <= seed <= MAX_SEED:
                raise PromptError(f"Seed must be between 0 and {MAX_SEED}.")
            if style not in STYLES:
                raise PromptError(f"Unknown style {style!r}.")
            styled, negative = apply_style(style, prompt, (negative or "").strip())
            styled_as = "" if style == "(no style)" else f" with the {style} style"
            check_prompt_length(text_encoder, styled, f"the prompt{styled_as}")
            if negative:
                check_prompt_length(text_encoder, negative, f"the negative prompt{styled_as}")
            if controlnet and condition not in conditions:
                raise PromptError(f"Unknown condition {condition!r}; this demo offers {', '.join(conditions)}.")
            if controlnet and not 0.0 <= float(conditioning_scale) <= MAX_CONDITIONING_SCALE:
                raise PromptError(f"Conditioning scale must be between 0 and {MAX_CONDITIONING_SCALE}.")
        except PromptError as err:
            raise gr.Error(str(err)) from None
        height, width = (int(v) for v in size.split(" x "))
        extra, preview, notice = {}, None, ""
        if controlnet and control_image is not None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConditionResizedWarning)
                condition_image = make_condition(control_image, height, width, CONDITION_CHOICES[condition], hed)
            notice = "".join(f" Note: {w.message}." for w in caught if issubclass(w.category, ConditionResizedWarning))
            extra = dict(c=control_latent(sampler.vae, condition_image, sampler.scale_factor),
                         conditioning_scale=float(conditioning_scale))
            preview = _to_pil((condition_image[0] + 1) / 2)
        features, mask = text_encoder.get_text_embeddings([styled])
        count = int(count)
        features = features.to(sampler.device, sampler.dtype).expand(count, -1, -1)
        mask = mask.to(sampler.device).expand(count, -1)
        neg = None
        if negative:
            neg_features, neg_mask = text_encoder.get_text_embeddings([negative])
            neg = (neg_features.to(sampler.device, sampler.dtype), neg_mask.to(sampler.device))
        total = int(steps)
        progress((0, total), desc="sampling", unit="steps")
        adapter = adapters[adapter_label]
        with switching:
            if sampler.adapters:
                sampler.use_adapters({adapter: float(lora_scale)} if adapter else {})
            images = sampler.sample(features, mask, height, width, [seed + i for i in range(count)], algo, total,
                                    float(guidance), negative=neg, extra_inputs=extra,
                                    progress=lambda step, n: progress((step, n), desc="sampling", unit="steps"))
        pictures = [_to_pil(image) for image in images]
        used = f" with LoRA {adapter_label} x {float(lora_scale):g}" if adapter else ""
        if not get_sampler(algo).guided:
            used += f" in {total} {sampler_label} step(s), without guidance"
        status = f"Generated {count} image(s) of {height} x {width} with seed {seed}{used}."
        if not controlnet:
            return pictures, seed, status
        controlled = (f" controlled by {condition} edges at scale {float(conditioning_scale):g}" if extra
                      else " without control (no control image)")
        return pictures, seed, status[:-1] + controlled + "." + notice, preview

    with gr.Blocks(title=title, css=PIXELATED_CSS) as demo:
        gr.Markdown(f"# {title}\nText-to-image with a PixArt diffusion transformer "
                    f"({type(sampler.model).__name__}, {sampler.image_size} px).")
        if note:
            gr.Markdown(note, elem_id="vocabulary")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative")
                style = gr.Dropdown(list(STYLES), value="(no style)", label="Style")
                sampler_label = gr.Radio(list(SAMPLER_CHOICES), value=default_sampler, label="Sampler")
                steps = gr.Slider(1, 250, value=DEFAULT_STEPS[SAMPLER_CHOICES[default_sampler]], step=1,
                                  label="Steps")
                guidance = gr.Slider(1.0, 15.0, value=default_guidance, step=0.1, label="Guidance scale",
                                     interactive=get_sampler(SAMPLER_CHOICES[default_sampler]).guided)
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed")
                    randomize = gr.Checkbox(value=True, label="Randomize seed")
                size = gr.Dropdown(sizes, value=default_size if default_size in sizes else sizes[0],
                                   label="Height x width")
                count = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Number of images")
                adapter = gr.Dropdown(list(adapters), value=list(adapters)[min(1, len(adapters) - 1)],
                                      label="LoRA adapter", elem_id="adapter", visible=len(adapters) > 1)
                lora_scale = gr.Slider(*LORA_SCALE_RANGE, value=1.0, step=0.05, label="LoRA scale",
                                       elem_id="lora-scale", visible=len(adapters) > 1)
                control_inputs = []
                if controlnet:
                    with gr.Group():
                        control_inputs = [
                            gr.Image(type="pil", label="Control image (its edges steer the image)",
                                     elem_id="control-image"),
                            gr.Radio(conditions, value="HED" if hed is not None else "Canny", label="Condition"),
                            gr.Slider(0.0, MAX_CONDITIONING_SCALE, value=1.0, step=0.05,
                                      label="Conditioning scale (1: as released, 0: no control)")]
                run = gr.Button("Generate", variant="primary", elem_id="generate")
                if examples:
                    gr.Examples([[example] for example in examples], [prompt], label="Example prompts (click one)",
                                elem_id="examples")
            with gr.Column():
                gallery = gr.Gallery(label="Images", elem_id="gallery", columns=2)
                status = gr.Markdown(elem_id="status")
                # PNG: an edge map is shown exactly as the model got it (Gradio's default WebP is lossy)
                control_outputs = ([gr.Image(label="Condition used", elem_id="condition", format="png")]
                                   if controlnet else [])
        sampler_label.change(lambda label: (gr.update(value=DEFAULT_STEPS[SAMPLER_CHOICES[label]]),
                                            gr.update(interactive=get_sampler(SAMPLER_CHOICES[label]).guided)),
                             sampler_label, [steps, guidance])
        run.click(generate, [prompt, negative, style, sampler_label, steps, guidance, seed, randomize, size, count,
                             adapter, lora_scale, *control_inputs], [gallery, seed, status, *control_outputs])
    return demo


def _to_pil(image):
    from PIL import Image
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)
