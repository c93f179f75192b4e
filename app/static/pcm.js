// Microphone samples -> 24 kHz mono PCM16 (little-endian), the input format of the realtime WebSocket.
//
// Loaded twice: as an AudioWorklet module (registers the "pcm16" processor, off the main thread) and as a plain
// script (the ScriptProcessor fallback of browsers without AudioWorklet uses the same resampler). The browser's
// own resampling (an AudioContext at 24 kHz) would be simpler, but Firefox refuses to connect a microphone to a
// context whose rate differs from the device's.
"use strict";

const PCM_RATE = 24000;
const PCM_CHUNK = 2400; // samples per message: 100 ms

// Averages the input over each output sample's span (a box filter: enough anti-aliasing for speech), keeping
// the fractional position across calls, so any input rate works (48 kHz, 44.1 kHz, 16 kHz).
class Pcm16Resampler {
  constructor(inputRate, outputRate = PCM_RATE, chunk = PCM_CHUNK) {
    this.span = inputRate / outputRate; // input samples per output sample
    this.chunk = chunk;
    this.sum = 0;
    this.weight = 0;
    this.out = new Int16Array(chunk);
    this.filled = 0;
  }

  // Float samples in [-1, 1] -> the completed chunks, each an ArrayBuffer of PCM16 LE.
  push(samples) {
    const chunks = [];
    for (let i = 0; i < samples.length; i++) {
      const x = samples[i];
      let left = 1;
      while (left > 0) {
        const take = Math.min(this.span - this.weight, left);
        this.sum += x * take;
        this.weight += take;
        left -= take;
        if (this.weight >= this.span - 1e-9) {
          this.emit(this.sum / this.weight, chunks);
          this.sum = 0;
          this.weight = 0;
        }
      }
    }
    return chunks;
  }

  // What is buffered, as a last (short) chunk, or null.
  flush() {
    if (this.filled === 0) return null;
    const chunk = this.encode(this.filled);
    this.filled = 0;
    return chunk;
  }

  emit(value, chunks) {
    const clipped = Math.max(-1, Math.min(1, value));
    this.out[this.filled++] = clipped < 0 ? clipped * 0x8000 : clipped * 0x7fff;
    if (this.filled === this.chunk) {
      chunks.push(this.encode(this.chunk));
      this.filled = 0;
    }
  }

  encode(length) {
    const buffer = new ArrayBuffer(length * 2);
    const view = new DataView(buffer);
    for (let i = 0; i < length; i++) view.setInt16(i * 2, this.out[i], true);
    return buffer;
  }
}

// Mono: the mean of the channels of one render quantum.
function downmix(channels) {
  if (channels.length === 1) return channels[0];
  const mono = new Float32Array(channels[0].length);
  for (const channel of channels) for (let i = 0; i < mono.length; i++) mono[i] += channel[i];
  for (let i = 0; i < mono.length; i++) mono[i] /= channels.length;
  return mono;
}

if (typeof registerProcessor === "function") {
  // AudioWorkletGlobalScope: `sampleRate` is the context's rate. Posts each chunk (transferred); "flush" posts
  // what is left, then {flushed: true}.
  class Pcm16Processor extends AudioWorkletProcessor {
    constructor() {
      super();
      this.resampler = new Pcm16Resampler(sampleRate);
      this.port.onmessage = (event) => {
        if (event.data !== "flush") return;
        const rest = this.resampler.flush();
        if (rest) this.port.postMessage(rest, [rest]);
        this.port.postMessage({ flushed: true });
      };
    }

    process(inputs) {
      const channels = inputs[0];
      if (channels && channels.length > 0) {
        for (const chunk of this.resampler.push(downmix(channels))) this.port.postMessage(chunk, [chunk]);
      }
      return true;
    }
  }
  registerProcessor("pcm16", Pcm16Processor);
} else {
  globalThis.Pcm16 = { Pcm16Resampler, downmix, PCM_RATE };
}
