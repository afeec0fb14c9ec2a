// ComfyUI-DreamPainter frontend extension (served through WEB_DIRECTORY = "./web").
//
// * DreamPainter Sampler and DreamPainter Insert: a before/after compare slider drawn on the node. They send
//   (product or photo, result) preview pairs as `dreampainter_compare`; hover moves the split, a click
//   steps through a batch. An orange frame and a title badge warn when 0 < lora_scale < 0.4,
//   where the paper finds the LoRA stops understanding the reference (attention_scale is the
//   slider that stays coherent down there).
//   Once the result is there, the compare slider replaces the stale live step preview. A title
//   badge says which mode ran (`dreampainter_mode`: dreampainter, or training-free without
//   DreamPainter weights).
// * DreamPainter Mask Refine: a caption above its overlay preview with what refining did
//   (share of the canvas kept, pixels added / removed), sent as `dreampainter_mask`.
//
// Everything is keyed on node type names; when the pack's nodes are absent nothing is patched.
// window.__dreampainter tells tests (and curious users) that the extension is active.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const SAMPLER = "DreamPainterSampler";
const INSERT = "DreamPainterInsert";  // the same slider, badge and lora_scale warning
const MASK_REFINE = "DreamPainterMaskRefine";
const LORA_WARN_BELOW = 0.4;
const ORANGE = "#e8912d";
const TEAL = "#3fb7a8";  // the training-free mode badge
const GREY = "#9aa0a6";

const state = (window.__dreampainter = Object.assign(window.__dreampainter || {}, {
  version: "0.1.0",
  active: false,
  patched: [],
  nodes: 0,
}));

function chain(proto, name, fn) {
  const orig = proto[name];
  proto[name] = function (...args) {
    const r = orig?.apply(this, args);
    fn.apply(this, args);
    return r;
  };
}

function viewUrl(ref) {
  if (!ref?.filename) return null;
  const q = new URLSearchParams({ filename: ref.filename, type: ref.type ?? "temp", subfolder: ref.subfolder ?? "" });
  return api.apiURL(`/view?${q}${app.getRandParam?.() ?? ""}`);
}

function loadImage(ref, onload) {
  const url = viewUrl(ref);
  if (!url) return null;
  const img = new Image();
  img.onload = onload;
  img.onerror = () => console.warn("DreamPainter: could not load preview", url);
  img.src = url;
  return img;
}

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function label(ctx, text, x, y, align = "left") {
  ctx.save();
  ctx.font = "11px sans-serif";
  const w = ctx.measureText(text).width + 8;
  const left = align === "left" ? x : x - w;
  ctx.fillStyle = "rgba(0,0,0,0.6)";
  ctx.fillRect(left, y, w, 16);
  ctx.fillStyle = "#eee";
  ctx.textBaseline = "middle";
  ctx.fillText(text, left + 4, y + 8);
  ctx.restore();
}

// ---------------------------------------------------------------------------------------------
// Sampler: before/after compare widget (drawn on the canvas, takes the node's free space)
// ---------------------------------------------------------------------------------------------

function compareWidget(node) {
  const w = {
    name: "dreampainter_compare",
    type: "dreampainter_compare",
    value: "",
    serialize: false, // not in widgets_values
    options: { serialize: false }, // not in the API prompt
    pairs: [],
    index: 0,
    split: 0.5,
    rect: null,
    computeLayoutSize() {
      return this.pairs.length ? { minHeight: 140, maxHeight: 1e6, minWidth: 0 } : { minHeight: 0, maxHeight: 24, minWidth: 0 };
    },
    draw(ctx, node, width, y) {
      const H = this.computedHeight ?? 0;
      this.rect = null;
      if (!this.pairs.length) {
        if (H >= 16) {
          ctx.save();
          ctx.fillStyle = "#888";
          ctx.font = "11px sans-serif";
          ctx.textAlign = "center";
          ctx.textBaseline = "middle";
          ctx.fillText("before / after compare appears after a run", width / 2, y + H / 2);
          ctx.restore();
        }
        return;
      }
      const pair = this.pairs[Math.min(this.index, this.pairs.length - 1)];
      const { before, after } = pair;
      if (!after?.complete || !after.naturalWidth) return;
      const margin = 10, caption = 18;
      const aw = width - 2 * margin, ah = H - caption - 6;
      if (aw <= 8 || ah <= 8) return;
      const s = Math.min(aw / after.naturalWidth, ah / after.naturalHeight);
      const dw = after.naturalWidth * s, dh = after.naturalHeight * s;
      const dx = margin + (aw - dw) / 2, dy = y + 2 + (ah - dh) / 2;
      this.rect = [dx, dy, dw, dh];
      ctx.save();
      ctx.imageSmoothingEnabled = s < 1;
      ctx.drawImage(after, dx, dy, dw, dh);
      const sx = dx + this.split * dw;
      if (before?.complete && before.naturalWidth) {
        ctx.save();
        ctx.beginPath();
        ctx.rect(dx, dy, sx - dx, dh);
        ctx.clip();
        ctx.drawImage(before, dx, dy, dw, dh);
        ctx.restore();
      }
      ctx.strokeStyle = "#fff";
      ctx.lineWidth = 2;
      ctx.beginPath();
      ctx.moveTo(sx, dy);
      ctx.lineTo(sx, dy + dh);
      ctx.stroke();
      ctx.fillStyle = "#fff";
      ctx.beginPath();
      ctx.arc(sx, dy + dh / 2, 5, 0, 2 * Math.PI);
      ctx.fill();
      ctx.restore();
      label(ctx, "product", dx + 2, dy + 2, "left");
      label(ctx, "result", dx + dw - 2, dy + 2, "right");
      ctx.save();
      ctx.fillStyle = "#aaa";
      ctx.font = "11px sans-serif";
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      const n = this.pairs.length;
      const more = n > 1 ? ` · ${this.index + 1}/${n}, click for next` : "";
      ctx.fillText(`hover to compare${more}`, width / 2, y + H - caption / 2);
      ctx.restore();
    },
    setSplit(x) {
      if (!this.rect) return false;
      const [dx, , dw] = this.rect;
      this.split = Math.max(0, Math.min(1, (x - dx) / dw));
      return true;
    },
    inside(pos) {
      if (!this.rect) return false;
      const [dx, dy, dw, dh] = this.rect;
      return pos[0] >= dx && pos[0] <= dx + dw && pos[1] >= dy && pos[1] <= dy + dh;
    },
    mouse(event, pos, node) {
      const type = event.type;
      if ((type === "pointerdown" || type === "mousedown") && this.pairs.length > 1 && this.inside(pos)) {
        this.index = (this.index + 1) % this.pairs.length;
      } else if (type === "pointermove" || type === "mousemove") {
        this.setSplit(pos[0]);
      }
      node.setDirtyCanvas(true, false);
      return true;
    },
    setPairs(pairs, node) {
      this.index = 0;
      this.split = 0.5;
      let pending = 0;
      const loaded = () => {
        pending -= 1;
        if (pending <= 0) state.compareReady = (state.compareReady ?? 0) + 1;
        node.setDirtyCanvas(true, true);
      };
      this.pairs = pairs.map((p) => {
        pending += 2;
        return { before: loadImage(p.before, loaded), after: loadImage(p.after, loaded) };
      });
      state.lastCompare = { node: node.id, pairs: pairs.length };
      node.setDirtyCanvas(true, true);
    },
  };
  return w;
}

function dropStepPreview(node) {
  // The live step previews (latent -> RGB) stay on a node after it ran; the compare slider shows the
  // result instead, so the stale preview goes and the node gets back the size it had before the run.
  try {
    const key = node.graph && node.graph.isRootGraph === false ? `${node.graph.id}:${node.id}` : String(node.id);
    const urls = app.nodePreviewImages?.[key];
    if (urls) {
      for (const url of urls) if (typeof url === "string" && url.startsWith("blob:")) URL.revokeObjectURL(url);
      delete app.nodePreviewImages[key];
    }
    node.imgs = undefined;
    node.preview = undefined;
    const i = node.widgets?.findIndex((w) => w.name === "$$canvas-image-preview") ?? -1;
    if (i >= 0) node.widgets.splice(i, 1)[0].onRemove?.();
    const before = node.__dreampainter?.sizeBeforeRun;
    if (before) {
      const min = node.computeSize();
      node.setSize([Math.max(before[0], min[0]), Math.max(before[1], min[1])]);
    }
  } catch (err) {
    console.warn("DreamPainter: could not remove the step preview", err);
  }
}

function patchSampler(nodeType) {
  const proto = nodeType.prototype;
  chain(proto, "onNodeCreated", function () {
    this.__dreampainter = { compare: this.addCustomWidget(compareWidget(this)) };
    state.nodes += 1;
  });
  chain(proto, "onExecutionStart", function () {
    if (!this.__dreampainter) return;
    this.__dreampainter.sizeBeforeRun = [...this.size];
    this.__dreampainter.stepPreviews = true;
  });
  chain(proto, "onExecuted", function (message) {
    const mode = message?.dreampainter_mode;
    if (this.__dreampainter && Array.isArray(mode) && mode.length) {
      this.__dreampainter.mode = String(mode[0]);
      this.setDirtyCanvas(true, false);
    }
    const pairs = message?.dreampainter_compare;
    const w = this.__dreampainter?.compare;
    if (!w || !Array.isArray(pairs) || !pairs.length) return;
    this.__dreampainter.stepPreviews = false;
    dropStepPreview(this);
    w.setPairs(pairs, this);
  });
  chain(proto, "onMouseMove", function (e, pos) {
    const w = this.__dreampainter?.compare;
    if (w?.inside(pos) && w.setSplit(pos[0])) this.setDirtyCanvas(true, false);
  });
  chain(proto, "onDrawForeground", function (ctx) {
    if (this.flags?.collapsed) return;
    // a step preview whose image finished loading after the run ended comes back: drop it again
    if (this.__dreampainter?.stepPreviews === false && this.imgs?.length) {
      dropStepPreview(this);
      this.setDirtyCanvas(true, true);
    }
    const T = globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
    let right = this.size[0] - 6;  // title badges are laid out from the right
    const ran = this.__dreampainter?.mode;
    if (ran) {  // which mode the last run used (auto picks training_free without DreamPainter weights)
      right = titleBadge(ctx, ran.replace("_", "-"), right, T, ran === "training_free" ? TEAL : GREY) - 4;
    }
    const lora = widget(this, "lora_scale");
    const v = Number(lora?.value);
    if (!lora || !(v > 0 && v < LORA_WARN_BELOW)) return;
    const H = globalThis.LiteGraph?.NODE_WIDGET_HEIGHT ?? 20;
    const y = lora.y ?? lora.last_y;
    ctx.save();
    ctx.strokeStyle = ORANGE;
    ctx.lineWidth = 2;
    if (y) {  // 0 until the node's widgets were laid out
      ctx.beginPath();
      ctx.roundRect?.(8, y - 2, this.size[0] - 16, H + 4, 6);
      ctx.stroke();
    }
    titleBadge(ctx, "lora < 0.4 \u26a0", right, T, ORANGE);
    ctx.restore();
  });
}

/** A filled badge in the title bar whose right edge is at `right`; returns its left edge. */
function titleBadge(ctx, text, right, T, color) {
  ctx.save();
  ctx.font = "bold 11px sans-serif";
  const tw = ctx.measureText(text).width + 10;
  ctx.fillStyle = color;
  ctx.fillRect(right - tw, -T + 7, tw, T - 14);
  ctx.fillStyle = "#111";
  ctx.textBaseline = "middle";
  ctx.fillText(text, right - tw + 5, -T / 2);
  ctx.restore();
  return right - tw;
}

// ---------------------------------------------------------------------------------------------
// Mask refine: a caption with what refining did, above the overlay preview
// ---------------------------------------------------------------------------------------------

function maskCaptionWidget() {
  return {
    name: "dreampainter_mask_stats",
    type: "dreampainter_mask_stats",
    value: "",
    serialize: false,
    options: { serialize: false },
    stats: null,
    computeSize(width) {
      return [width ?? 200, this.stats ? 18 : 0];
    },
    draw(ctx, node, width, y) {
      const s = this.stats;
      if (!s) return;
      const pct = (100 * s.coverage).toFixed(1);
      const text = `kept ${pct}% of ${s.width}x${s.height} · refine +${s.added} / \u2212${s.removed} px`;
      ctx.save();
      ctx.font = "11px sans-serif";
      ctx.fillStyle = s.coverage > 0 ? "#9c9" : ORANGE;
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      ctx.fillText(s.coverage > 0 ? text : "the refined mask is empty: nothing would be kept", width / 2, y + 9);
      ctx.restore();
    },
  };
}

function patchMaskRefine(nodeType) {
  const proto = nodeType.prototype;
  chain(proto, "onNodeCreated", function () {
    this.__dreampainter = { caption: this.addCustomWidget(maskCaptionWidget()) };
    state.nodes += 1;
  });
  chain(proto, "onExecuted", function (message) {
    const stats = message?.dreampainter_mask?.[0];
    const w = this.__dreampainter?.caption;
    if (!w || !stats) return;
    w.stats = stats;
    state.lastMaskStats = stats;
    this.setDirtyCanvas(true, true);
  });
}

app.registerExtension({
  name: "DreamPainter.UI",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    try {
      if (nodeData?.name === SAMPLER || nodeData?.name === INSERT) patchSampler(nodeType);
      else if (nodeData?.name === MASK_REFINE) patchMaskRefine(nodeType);
      else return;
      state.patched.push(nodeData.name);
    } catch (err) {
      console.warn("DreamPainter: extension disabled for", nodeData?.name, err);
    }
  },
  setup() {
    state.active = true;
  },
});
