// A page without a module of its own (the refusal of a page the key may not see): the
// shared shell only, with the live status in the top bar.
import { onEvent } from "./core.js";

onEvent([], () => {});
