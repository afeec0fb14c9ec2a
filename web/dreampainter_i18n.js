// Keeps the pack's translations (locales/<lang>/nodeDefs.json, served by ComfyUI at /i18n) in the UI.
//
// The frontend ComfyUI 0.3.75 pins (comfyui-frontend-package 1.32.9) merges custom nodes' translations
// once, at start-up, and loads a locale's own messages lazily with setLocaleMessage, which replaces
// everything merged into that locale before. With Comfy.Locale = zh the DreamPainter nodes then show in
// English (Comfy-Org/ComfyUI_frontend#6748; fixed upstream by #7214, "preserve custom nodes i18n data
// when locales are lazily loaded"). This extension merges the pack's own node translations again
// whenever a locale's messages are set. On a frontend with the fix, or without the internals used here,
// it changes nothing.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const PREFIX = "DreamPainter";

function globalComposer() {
  const vue = document.querySelector("#vue-app")?.__vue_app__;
  const key = vue?.__VUE_I18N_SYMBOL__;
  const composer = key ? vue._context?.provides?.[key]?.global : null;
  return composer && typeof composer.mergeLocaleMessage === "function" &&
    typeof composer.setLocaleMessage === "function" ? composer : null;
}

/** {lang: {nodeDefs: {<the pack's node ids>: ...}}} out of GET /i18n: the pack's entries only. */
function ownTranslations(all) {
  const out = {};
  for (const [lang, messages] of Object.entries(all ?? {})) {
    const defs = Object.entries(messages?.nodeDefs ?? {}).filter(([id]) => id.startsWith(PREFIX));
    if (defs.length) out[lang] = { nodeDefs: Object.fromEntries(defs) };
  }
  return out;
}

app.registerExtension({
  name: "DreamPainter.I18n",
  // init runs before the node definitions are registered (and translated), so titles come out right
  async init() {
    const composer = globalComposer();
    if (!composer) return;
    let own;
    try {
      own = ownTranslations(await api.getCustomNodesI18n());
    } catch (err) {
      console.warn("DreamPainter: could not read the pack's translations from /i18n", err);
      return;
    }
    const apply = (lang) => { if (own[lang]) composer.mergeLocaleMessage(lang, own[lang]); };
    const setLocaleMessage = composer.setLocaleMessage;
    composer.setLocaleMessage = function (lang, messages) {
      const result = setLocaleMessage.call(this, lang, messages);
      apply(lang);
      return result;
    };
    Object.keys(own).forEach(apply);  // a locale loaded before this ran lost them already
    window.__dreampainterI18n = { languages: Object.keys(own) };
  },
});
