// AudioToken frontend extension `audiotoken.searchAliases`: our nodes are found in the node search by the words people
// type ("sound", "audio to image", "voice", "music", ...). The words live in web/search_aliases.json, which the Python
// schemas read too (nodes/audiotoken_nodes.py schema()).
//  - Servers whose node schema has search_aliases send them in /object_info; ComfyUI 0.3.75 drops them, so
//    beforeRegisterVueAppNodeDefs (a public hook of the pinned frontend 1.32 and of later ones) adds them to our
//    node definitions, which newer frontends (1.58 does) index in their node search.
//  - The frontend ComfyUI 0.3.75 pins (1.32) searches only name and display_name and has no hook for it: there the
//    search of the node-definition store is extended to match our aliases too (its Vue app's store, not a public
//    API; a console warning says so if a frontend lacks it).
import { app } from "../../../scripts/app.js";

const ALIASES_URL = new URL("../search_aliases.json", import.meta.url);

async function audiotokenLoadAliases() {
  const response = await fetch(ALIASES_URL);
  if (!response.ok) throw new Error(`audiotoken: ${ALIASES_URL} answered HTTP ${response.status}`);
  return await response.json();
}

const AUDIOTOKEN_SEARCH_ALIASES = await audiotokenLoadAliases();

/** The node definitions' search_aliases with ours added (once each), for the frontend's node search. */
export function audiotokenAddAliases(defs, aliases = AUDIOTOKEN_SEARCH_ALIASES) {
  for (const def of defs) {
    const ours = aliases[def.name];
    if (!ours) continue;
    def.search_aliases = [...new Set([...(def.search_aliases ?? []), ...ours])];
  }
  return defs;
}

/** Does `alias` answer the query as the user typed it (every word of the query in the alias, any case)? */
export function audiotokenAliasMatches(query, alias) {
  const words = query.toLowerCase().split(/\s+/).filter(Boolean);
  const text = alias.toLowerCase();
  return words.length > 0 && words.every((w) => text.includes(w));
}

function audiotokenExtendOldSearch() {
  const pinia = document.getElementById("vue-app")?.__vue_app__?.config?.globalProperties?.$pinia;
  const fuseSearch = pinia?._s?.get("nodeDef")?.nodeSearchService?.nodeFuseSearch;
  if (!fuseSearch || !Array.isArray(fuseSearch.keys) || typeof fuseSearch.search !== "function") {
    console.warn("audiotoken: this frontend's node search is not the one expected; our search aliases are not added to it");
    return;
  }
  if (fuseSearch.keys.includes("search_aliases")) return; // the frontend indexes them itself
  const proto = Object.getPrototypeOf(fuseSearch);
  if (proto.audiotokenAliases) return;
  const search = proto.search;
  proto.audiotokenAliases = true;
  proto.search = function (query, options) {
    const found = search.call(this, query, options);
    if (!query || !this.keys.includes("display_name")) return found; // not the node search (no query: everything)
    const extra = this.data.filter((def) => !found.includes(def)
      && (AUDIOTOKEN_SEARCH_ALIASES[def?.name] ?? []).some((alias) => audiotokenAliasMatches(query, alias)));
    return [...found, ...extra];
  };
}

app.registerExtension({
  name: "audiotoken.searchAliases",
  beforeRegisterVueAppNodeDefs(defs) {
    audiotokenAddAliases(defs);
  },
  async setup() {
    audiotokenExtendOldSearch();
  },
});
