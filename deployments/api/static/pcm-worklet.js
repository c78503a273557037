// The live session's audio capture: the microphone's first channel, as little-endian float32 PCM at
// the AudioContext's rate (the page opens it at 48 kHz), handed to the page in 100 ms pieces.
"use strict";

class PcmCapture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.piece = new Float32Array(sampleRate / 10);
    this.filled = 0;
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (!channel) return true;
    for (let i = 0; i < channel.length; i++) {
      this.piece[this.filled++] = channel[i];
      if (this.filled === this.piece.length) {
        this.port.postMessage(this.piece.buffer, [this.piece.buffer]);
        this.piece = new Float32Array(sampleRate / 10);
        this.filled = 0;
      }
    }
    return true;
  }
}

registerProcessor("pcm-capture", PcmCapture);
