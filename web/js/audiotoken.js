// AudioToken frontend extension. Issue 4 adds the player, spectrogram and loss chart;
// for now it only gives the pack's nodes one recognisable colour.
import { app } from "../../scripts/app.js";

const AUDIOTOKEN_COLOR = { color: "#2a4d63", bgcolor: "#1c3342" };

app.registerExtension({
  name: "audiotoken.nodeColors",
  nodeCreated(node) {
    if (node.comfyClass && node.comfyClass.startsWith("AudioToken")) {
      node.color = AUDIOTOKEN_COLOR.color;
      node.bgcolor = AUDIOTOKEN_COLOR.bgcolor;
    }
  },
});
